"""pretrain_moe.py end to end, on CPU ranks with gloo: layout invariance of the logged loss and
grad norm, exact resume, crash-safe saves, SIGTERM, and the command line's error messages."""

import contextlib
import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import pretrain_moe
from megamoe.training.save_lock import LOCK_FILE
from tests.fixtures import REPO, TINY_MOE, read_json_log, run_main
from tests.harness import run_distributed

def test_logged_loss_and_grad_norm_do_not_depend_on_layout(tmp_path):
    layouts = {
        "ep1": ["--expert-model-parallel-size", "1"],
        "ep2": ["--expert-model-parallel-size", "2", "--use-distributed-optimizer", "--overlap-grad-reduce"],
        "ep4": ["--expert-model-parallel-size", "4"],
        "tp2ep2": ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--use-distributed-optimizer"],
    }
    runs = [TINY_MOE + ["--train-iters", "4", "--log-params-norm", "--log-json", str(tmp_path / f"{k}.jsonl")] + v
            for k, v in layouts.items()]
    run_distributed(run_main, 4, runs, timeout=600)
    logs = {k: read_json_log(tmp_path / f"{k}.jsonl") for k in layouts}
    reference = logs["ep1"]
    assert len(reference) == 4 and all(r["params_norm"] > 0 for r in reference)
    # Mock data is uniform random tokens: the loss stays near ln(vocab), but the weights must move.
    assert len({r["params_norm"] for r in reference}) == 4
    for name, log in logs.items():
        for ref, got in zip(reference, log, strict=True):
            for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm", "grad_norm_inf", "params_norm"):
                assert got[key] == pytest.approx(ref[key], rel=1e-5), (name, ref["iteration"], key)
            assert got["expert_tokens_max"] == ref["expert_tokens_max"], name


def _final_params(save_dir, world):
    """Iteration and full parameters of the latest checkpoint (``world``: the ranks that saved it)."""
    from megamoe.checkpointing.format import read_metadata
    from megamoe.checkpointing.convert.sharded_reader import ShardedReader

    directory, metadata = read_metadata(save_dir)
    assert metadata["layout"]["world_size"] == world
    reader = ShardedReader(directory, metadata)
    return metadata["iteration"], [{name: s["param"] for name, s in reader.read(list(reader.info.specs)).items()}]


def test_resume_is_exact(tmp_path):
    common = TINY_MOE + ["--expert-model-parallel-size", "2", "--use-distributed-optimizer", "--train-iters", "6",
                         "--lr-decay-style", "cosine"]
    straight = common + ["--save", str(tmp_path / "straight"), "--log-json", str(tmp_path / "straight.jsonl")]
    first_half = common + ["--save", str(tmp_path / "halves"), "--save-interval", "3",
                           "--log-json", str(tmp_path / "halves.jsonl"), "--exit-signal-handler"]
    # The first half stops at iteration 3 by being given 3 train iterations on the same schedule.
    first_half = first_half + ["--lr-decay-iters", "6"]
    first_half[first_half.index("--train-iters") + 1] = "3"
    # Resumed with activation recomputation: an execution choice, not a different model.
    second_half = common + ["--load", str(tmp_path / "halves"), "--save", str(tmp_path / "halves"),
                            "--log-json", str(tmp_path / "halves.jsonl"), "--recompute-granularity", "full"]
    run_distributed(run_main, 4, [straight, first_half, second_half], timeout=600)
    a = read_json_log(tmp_path / "straight.jsonl")
    b = read_json_log(tmp_path / "halves.jsonl")
    assert [r["iteration"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b, strict=True):
        assert ra["lm_loss"] == rb["lm_loss"] and ra["grad_norm"] == rb["grad_norm"], (ra, rb)
        assert ra["consumed_samples"] == rb["consumed_samples"]
    it_a, params_a = _final_params(tmp_path / "straight", 4)
    it_b, params_b = _final_params(tmp_path / "halves", 4)
    assert it_a == it_b == 6
    for pa, pb in zip(params_a, params_b):
        for name in pa:
            assert torch.equal(pa[name], pb[name]), name


def _listing(save: str) -> list[str]:
    """What a save root holds besides the run lock's file."""
    return sorted(name for name in os.listdir(save) if name != LOCK_FILE)


def _second_save_fails(rank, world, argv_first, argv_second):
    """The first run saves; the second may write files of at most half the first's shard
    (RLIMIT_FSIZE: the kernel fails the write, EFBIG).  Returns the second run's exit status and
    what it printed on stderr."""
    os.environ["WORLD_SIZE"] = str(world)
    assert pretrain_moe.main(argv_first) == 0
    save = argv_first[argv_first.index("--save") + 1]
    limit = os.path.getsize(os.path.join(save, "iter_0000002", "shard_00000.pt")) // 2
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            status = pretrain_moe.main(argv_second)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, xfsz)
    return status, stderr.getvalue()


@pytest.mark.parametrize("mode", [[], ["--async-save"]], ids=["sync", "async"])
def test_failed_save_exits_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, mode):
    save = str(tmp_path / "ckpt")
    base = TINY_MOE[:] + ["--save", save, "--lr-decay-iters", "4"] + mode
    base[base.index("--global-batch-size") + 1] = "2"
    first = base + ["--train-iters", "2"]
    second = base + ["--train-iters", "4", "--load", save]
    (status, stderr), = run_distributed(_second_save_fails, 1, first, second, timeout=300)
    shard = os.path.join(save, "iter_0000004.partial", "shard_00000.pt")
    assert status == 2
    assert re.fullmatch(re.escape(f"pretrain_moe.py: error: iteration 4 was not saved to {save}: writing {shard} "
                                  "failed (File too large); it needs ") + r"[\d,]+ bytes, [\d,]+ free now; "
                        r"iteration 2 stays the latest checkpoint\n", stderr), stderr
    from megamoe.checkpointing.format import read_metadata

    assert read_metadata(save)[1]["iteration"] == 2
    assert _listing(save) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    # What a save killed midway leaves, the next published save deletes.
    os.makedirs(os.path.join(save, "iter_0000009.partial"))
    resumed = base + ["--train-iters", "3", "--load", save]
    run_distributed(run_main, 1, [resumed], timeout=300)
    assert read_metadata(save)[1]["iteration"] == 3
    assert _listing(save) == ["iter_0000002", "iter_0000003", "latest_checkpointed_iteration.txt"]


def _stdout_of_main(rank, world, argv):
    os.environ["WORLD_SIZE"] = str(world)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert pretrain_moe.main(argv) == 0
    return stdout.getvalue()


def test_async_save_resumes_exactly(tmp_path):
    """Checkpoints written in the background while training goes on resume as the synchronous ones do."""
    save = str(tmp_path / "ckpt")
    # The first run stops at iteration 3 on the schedule of 5 iterations.
    base = TINY_MOE + ["--expert-model-parallel-size", "2", "--use-distributed-optimizer", "--lr-decay-iters", "5"]
    straight = base + ["--train-iters", "5", "--log-json", str(tmp_path / "straight.jsonl")]
    first = base + ["--train-iters", "3", "--save", save, "--save-interval", "1", "--async-save", "--keep-last", "2"]
    second = base + ["--train-iters", "5", "--load", save, "--log-json", str(tmp_path / "resumed.jsonl")]
    run_distributed(run_main, 2, [straight], timeout=300)
    printed = run_distributed(_stdout_of_main, 2, first, timeout=300)[0]
    assert _listing(save) == ["iter_0000002", "iter_0000003", "latest_checkpointed_iteration.txt"]
    # Each background save says when it is complete and published.
    done = [line for line in printed.splitlines() if line.startswith("background save complete")]
    assert done == [f"background save complete: {save} at iteration {i} is the latest checkpoint" for i in (1, 2, 3)]
    run_distributed(run_main, 2, [second], timeout=300)
    want = {r["iteration"]: r for r in read_json_log(tmp_path / "straight.jsonl")}
    got = read_json_log(tmp_path / "resumed.jsonl")
    assert [r["iteration"] for r in got] == [4, 5]
    for record in got:
        assert record["lm_loss"] == want[record["iteration"]]["lm_loss"]
        assert record["grad_norm"] == want[record["iteration"]]["grad_norm"]


def _cli(*args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "pretrain_moe.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--global-batch-size", "7"], "--global-batch-size 7 is not divisible by --micro-batch-size 2"),
        (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size 3 does not divide the world size 1"),
        (["--num-attention-heads", "5"], "--hidden-size 32 is not divisible by --num-attention-heads 5"),
        (["--bf16", "--fp16"], "--bf16 and --fp16 are mutually exclusive"),
        (["--lr-decay-style", "step"], "--lr-decay-style 'step'"),
        (["--compile", "--recompute-granularity", "full"], "--compile and --recompute-granularity cannot be combined"),
        (["--recompute-granularity", "partial"], "--recompute-granularity 'partial': valid values are ['full', 'selective']"),
        (["--data-path", "/nonexistent/corpus", "--tokenizer-model", "x.model"], None),
    ],
)
def test_bad_flags_give_one_line_errors(extra, message, capsys, monkeypatch):
    argv = TINY_MOE
    if "--data-path" in extra or "--split" in extra:  # real data (the built-in corpus, or none)
        argv = [a for a in TINY_MOE if a not in ("--mock-data", "--vocab-size", "200")]
    argv = [*argv, "--train-iters", "2", *extra]
    if "--split" in extra:  # found when the trainer opens the data, after torch.distributed is up
        result = _cli(*argv)
    else:  # found by parse_config, before anything starts: pretrain_moe.main in this process
        monkeypatch.setenv("WORLD_SIZE", "1")
        result = SimpleNamespace(returncode=pretrain_moe.main(argv), stderr=capsys.readouterr().err)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pretrain_moe.py: error: "), result.stderr
    assert message is None or message in lines[0], lines[0]
    if message is None:
        assert "/nonexistent/corpus" in lines[0]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    save = tmp_path / "ckpt"
    log = tmp_path / "log.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "pretrain_moe.py", *TINY_MOE, "--train-iters", "100000", "--save", str(save),
         "--log-json", str(log), "--exit-signal-handler"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM received" in out
    from megamoe.checkpointing.format import read_metadata

    directory, metadata = read_metadata(str(save))
    assert metadata["iteration"] >= 2


def test_exit_interval_and_exit_duration_save_and_stop_on_every_rank(tmp_path):
    """--exit-interval 3 stops (and saves) after iteration 3 of 6; --exit-duration-in-mins, once
    the time is up, after the next iteration, on both ranks together."""
    base = TINY_MOE + ["--train-iters", "6"]
    runs = {
        "interval": base + ["--exit-interval", "3"],
        "duration": base + ["--exit-duration-in-mins", "0.0001"],  # 6 ms: up by the end of the first step
    }
    argvs = [argv + ["--save", str(tmp_path / name), "--log-json", str(tmp_path / f"{name}.jsonl")]
             for name, argv in runs.items()]
    run_distributed(run_main, 2, argvs, timeout=300)
    from megamoe.checkpointing.format import read_metadata

    for name, last in (("interval", 3), ("duration", 1)):
        assert [r["iteration"] for r in read_json_log(tmp_path / f"{name}.jsonl")] == list(range(1, last + 1)), name
        assert read_metadata(str(tmp_path / name))[1]["iteration"] == last, name


def test_loading_another_layout_reshards_and_continues_exactly(tmp_path):
    """Saved at EP 2 with ZeRO-1 on 2 ranks, resumed at EP 1 without ZeRO-1 on 1 rank: the steps
    after the load are the ones the 2-rank run takes after its own save."""
    save = str(tmp_path / "ckpt")
    two = TINY_MOE + ["--expert-model-parallel-size", "2", "--use-distributed-optimizer", "--lr-decay-iters", "4"]
    run_distributed(run_main, 2, [two + ["--train-iters", "2", "--save", save],
                                   two + ["--train-iters", "4", "--load", save, "--log-json", str(tmp_path / "two.jsonl")]],
                    timeout=300)
    one = TINY_MOE + ["--train-iters", "4", "--lr-decay-iters", "4", "--load", save, "--log-json",
                      str(tmp_path / "one.jsonl")]
    run_distributed(run_main, 1, [one], timeout=300)
    two_log, one_log = read_json_log(tmp_path / "two.jsonl"), read_json_log(tmp_path / "one.jsonl")
    assert [r["iteration"] for r in one_log] == [r["iteration"] for r in two_log] == [3, 4]
    for a, b in zip(two_log, one_log):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-6, abs=1e-6), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def _weights_only_body(rank, world, save, argv):
    os.environ["WORLD_SIZE"] = str(world)
    from megamoe.checkpointing.format import CheckpointError, read_metadata, write_metadata

    directory, metadata = read_metadata(save)
    metadata["optimizer"] = None  # what an import from Hugging Face holds
    metadata["tensors"] = {k: v for k, v in metadata["tensors"].items() if not k.startswith("optim/")}
    write_metadata(directory, metadata)
    from megamoe.training.arguments import parse_config
    from megamoe.training.trainer import pretrain

    with pytest.raises(CheckpointError, match="no optimizer state.*--finetune"):
        pretrain(parse_config(argv))
    assert pretrain_moe.main(argv + ["--finetune"]) == 0


def test_checkpoint_without_optimizer_state_asks_for_finetune(tmp_path):
    save = str(tmp_path / "ckpt")
    base = TINY_MOE + ["--train-iters", "2"]
    run_distributed(run_main, 1, [base + ["--save", save]], timeout=300)
    run_distributed(_weights_only_body, 1, save, base + ["--load", save], timeout=300)


def test_keep_last_prunes_only_older_complete_checkpoints(tmp_path):
    save = tmp_path / "ckpt"
    argv = TINY_MOE + ["--train-iters", "4", "--save", str(save), "--save-interval", "1", "--keep-last", "2"]
    run_distributed(run_main, 1, [argv], timeout=300)
    assert _listing(save) == ["iter_0000003", "iter_0000004", "latest_checkpointed_iteration.txt"]


@pytest.mark.parametrize("world,layout", [(1, []), (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                                          (2, ["--pipeline-model-parallel-size", "2"])], ids=["1-rank", "tp2-sp", "pp2"])
def test_regional_compile_trains_like_eager(tmp_path, world, layout):
    argv = TINY_MOE + ["--train-iters", "2"] + layout
    eager, compiled = tmp_path / "eager.jsonl", tmp_path / "compiled.jsonl"
    run_distributed(run_main, world, [argv + ["--log-json", str(eager)],
                                      argv + ["--compile", "--log-json", str(compiled)]], timeout=600)
    for a, b in zip(read_json_log(eager), read_json_log(compiled), strict=True):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def _reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def test_fp16_overflow_steps_are_skipped_and_logged_as_strict_json(tmp_path):
    log = tmp_path / "fp16.jsonl"
    argv = TINY_MOE + ["--train-iters", "3", "--fp16", "--initial-loss-scale", str(2.0**40), "--hysteresis", "1",
                       "--log-json", str(log)]
    run_distributed(run_main, 1, [argv], timeout=300)
    records = [json.loads(line, parse_constant=_reject_constant) for line in log.read_text().splitlines()]
    assert records[0]["grad_norm"] is None and records[0]["skipped_iters"] == 1
    assert records[1]["loss_scale"] < records[0]["loss_scale"]


def test_data_made_with_another_tokenizer_is_refused(tmp_path):
    import numpy as np

    from megamoe.data.default_corpus import ensure_default_corpus
    from megamoe.data.indexed_dataset import IndexedDatasetWriter
    from megamoe.data.tokenizer import load_tokenizer
    from megamoe.training.arguments import ConfigError, parse_config

    _, tokenizer_model = ensure_default_corpus()
    vocab = load_tokenizer(tokenizer_model).vocab_size
    prefix = str(tmp_path / "foreign")
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        writer.add_document(np.array([5, vocab + 7, 9], dtype=np.int32))
    argv = [a for a in TINY_MOE if a not in ("--mock-data", "--vocab-size", "200")]
    with pytest.raises(ConfigError, match=rf"--data-path {prefix} holds token id {vocab + 7} but --tokenizer-model"):
        parse_config(argv + ["--data-path", prefix, "--tokenizer-model", tokenizer_model], world_size=1)
    with pytest.raises(ConfigError, match=r"--data-path 0.5 a 0.5: expected weight prefix pairs"):
        parse_config(argv + ["--data-path", "0.5", "a", "0.5", "--tokenizer-model", tokenizer_model], world_size=1)


def test_no_load_optim_keeps_the_position_and_finetune_restarts_it(tmp_path):
    save = str(tmp_path / "ckpt")
    base = TINY_MOE + ["--train-iters", "4"]
    no_optim, finetune = tmp_path / "no_optim.jsonl", tmp_path / "finetune.jsonl"
    run_distributed(run_main, 1, [
        base[:-1] + ["2", "--save", save],
        base + ["--load", save, "--no-load-optim", "--no-load-rng", "--log-json", str(no_optim)],
        base[:-1] + ["2", "--load", save, "--finetune", "--log-json", str(finetune)],
    ], timeout=300)
    assert [r["iteration"] for r in read_json_log(no_optim)] == [3, 4]
    assert read_json_log(no_optim)[0]["consumed_samples"] == 3 * 8
    assert [r["iteration"] for r in read_json_log(finetune)] == [1, 2]


def test_eod_mask_loss_zeroes_the_loss_after_each_document_end():
    from megamoe.training.arguments import ConfigError, parse_config
    from megamoe.training.trainer import prepare_batch

    batch = {"tokens": torch.tensor([[5, 2, 7, 2]]), "labels": torch.tensor([[2, 7, 2, 9]]),
             "loss_mask": torch.ones(1, 4)}
    masked = prepare_batch(batch, torch.device("cpu"), eod_mask_token=2)
    assert masked["loss_mask"].tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert prepare_batch(batch, torch.device("cpu"))["loss_mask"].tolist() == [[1.0] * 4]
    real_data = [a for a in TINY_MOE if a not in ("--mock-data", "--vocab-size", "200")]
    cfg = parse_config(real_data + ["--eod-mask-loss"], world_size=1)
    assert cfg.eod_mask_token is not None and cfg.eod_mask_token == cfg.eod_token_id
    assert parse_config(real_data, world_size=1).eod_mask_token is None
    with pytest.raises(ConfigError, match="--eod-mask-loss needs real data"):
        parse_config(TINY_MOE + ["--eod-mask-loss"], world_size=1)


def test_expert_tensor_parallel_checkpoints_reshard_both_ways(tmp_path):
    """TP 2 + SP on 4 ranks: saved with whole experts (ETP 1, EP 4), resumed with experts split
    over TP (ETP 2, EP 2), directly and through tools/convert_checkpoint.py's
    --target-expert-tensor-parallel-size, and back; every resumed step is the one the saving
    layout takes next."""
    from megamoe.checkpointing.convert.run import convert

    sp = TINY_MOE + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer",
                     "--lr-decay-iters", "4"]
    etp1 = sp + ["--expert-tensor-parallel-size", "1", "--expert-model-parallel-size", "4"]
    etp2 = sp + ["--expert-tensor-parallel-size", "2", "--expert-model-parallel-size", "2"]
    for name, saver, loader, (etp, ep) in (("1to2", etp1, etp2, (2, 2)), ("2to1", etp2, etp1, (1, 4))):
        save, converted = str(tmp_path / name), str(tmp_path / f"{name}.converted")
        run_distributed(run_main, 4, [saver + ["--train-iters", "2", "--save", save]], timeout=300)
        convert(save, converted, target_expert_tensor_parallel_size=etp, target_expert_parallel_size=(ep,),
                progress=None)
        logs = {k: str(tmp_path / f"{name}.{k}.jsonl") for k in ("same", "other", "converted")}
        run_distributed(run_main, 4, [
            saver + ["--train-iters", "4", "--load", save, "--log-json", logs["same"]],
            loader + ["--train-iters", "4", "--load", save, "--log-json", logs["other"]],
            loader + ["--train-iters", "4", "--load", converted, "--log-json", logs["converted"]],
        ], timeout=400)
        same = read_json_log(logs["same"])
        assert [r["iteration"] for r in same] == [3, 4]
        for kind in ("other", "converted"):
            got = read_json_log(logs[kind])
            assert [r["iteration"] for r in got] == [3, 4], kind
            for a, b in zip(same, got):
                assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-6, abs=1e-6), (name, kind, a, b)
                assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), (name, kind, a, b)
