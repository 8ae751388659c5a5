"""Resharding a megamoe checkpoint between layouts (TP, EP per MoE layer, DP, ZeRO-1) loses
nothing: there and back is bitwise, and training continues in the new layout exactly as it
would have in the old one."""

import json
import os

import pytest
import torch

import pretrain_moe
from megamoe.checkpointing.convert.full_state import stream_groups
from megamoe.checkpointing.convert.run import convert, open_source
from tests.checkpointing.save_load import Run, load_and_step
from tests.harness import run_distributed

# Targets of layout A (world 4, TP 2, EP (2, 1), ZeRO-1): every dimension changes in each.
B_WORLD2_TP1 = Run(world=2, tp=1, eps=(1, 2), zero=False)
B_WORLD8_TP2 = Run(world=8, tp=2, eps=(4, 2), zero=True)
B_WORLD4_TP1 = Run(world=4, tp=1, eps=(4, 1), zero=False)
B_WORLD2_TP2 = Run(world=2, tp=2, eps=(1, 1), zero=True)


def _flags(run: Run) -> dict:
    return dict(
        target_world_size=run.world,
        target_tensor_parallel_size=run.tp,
        target_expert_parallel_size=run.eps,
        target_use_distributed_optimizer=run.zero,
    )


def _load(root: str):
    """``(metadata without its file and chunk lists and its own checksum, FullStateInfo, every full
    tensor)`` of a checkpoint."""
    reader, _ = open_source(root, None)
    metadata = dict(reader.files.metadata)
    for key in ("checkpoint_id", "tensors", "files", "rng", "metadata_crc32"):
        metadata.pop(key)
    full = {}
    for _, names in stream_groups(list(reader.info.specs)):
        full.update(reader.read(names))
    return metadata, reader.info, full


def assert_identical(got, want, where: str = "") -> None:
    """Same structure; tensors bitwise equal (dtype, shape and bytes); other values equal."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: keys {list(got)} != {list(want)}"
        for key in want:
            assert_identical(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_identical(g, w, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{where}: values differ"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("via", [B_WORLD2_TP1, B_WORLD8_TP2, B_WORLD4_TP1, "consolidated"], ids=str)
def test_there_and_back_is_bitwise(trained, tmp_path, via):
    middle, back = str(tmp_path / "middle"), str(tmp_path / "back")
    if via == "consolidated":
        convert(trained.root, middle, to="consolidated", progress=None)
    else:
        convert(trained.root, middle, **_flags(via), progress=None)
    summary = convert(middle, back, **_flags(trained.run), progress=None)
    want_meta, want_info, want = _load(trained.root)
    got_meta, got_info, got = _load(back)
    assert_identical(got_meta, want_meta, "metadata.json")
    assert_identical(got, want, "full state")
    # The model-parallel RNG stream of a TP rank survives a stop in a layout with fewer TP ranks
    # only in the consolidated form; a resharded one gets a fresh stream for the new TP rank.
    keep_rng = via == "consolidated" or via.tp >= trained.run.tp
    (got_rng,), (want_rng,) = got_info.rng, want_info.rng  # [pp][dp][tp]: one stage
    for dp, (g_row, w_row) in enumerate(zip(got_rng, want_rng, strict=True)):
        for tp, (g, w) in enumerate(zip(g_row, w_row, strict=True)):
            if not keep_rng:
                g, w = {"torch_cpu": g["torch_cpu"]}, {"torch_cpu": w["torch_cpu"]}
            assert_identical(g, w, f"rng of dp {dp} tp {tp}")
    assert summary.source_full.digest == summary.target_full.digest


def test_full_state_does_not_depend_on_the_layout_it_is_read_from(trained, tmp_path):
    direct = convert(trained.root, str(tmp_path / "direct"), to="consolidated", progress=None)
    convert(trained.root, str(tmp_path / "b"), **_flags(B_WORLD8_TP2), progress=None)
    resharded = convert(str(tmp_path / "b"), str(tmp_path / "via_b"), to="consolidated", progress=None)
    assert str(direct.source_full) == str(resharded.source_full)
    # 17 parameters, each with its weight, fp32 master and two Adam moments.
    assert direct.source_full.count == 17 * 4


def test_summary_accounts_for_every_source_tensor(trained, tmp_path):
    summary = convert(trained.root, str(tmp_path / "b"), **_flags(B_WORLD2_TP1), progress=None)
    reader, _ = open_source(trained.root, None)
    on_disk = sum(len(p["tensors"]) for p in reader.files.payloads.values())
    assert summary.files_read == 4
    assert summary.tensors_read == on_disk == summary.tensors_used
    # Training wrote each box once: no replica on disk to compare.
    assert summary.replicas_compared == 0
    assert str(summary.target_full) == str(summary.source_full)
    text = "\n".join(summary.lines())
    assert f"checksum {summary.source_full.digest:016x}" in text and "replicas compared bitwise" in text


def test_training_continues_in_the_new_layout_as_in_the_old(trained, tmp_path):
    direct = str(tmp_path / "direct")
    convert(trained.root, direct, **_flags(B_WORLD2_TP1), progress=None)
    consolidated, via_full = str(tmp_path / "full"), str(tmp_path / "via_full")
    convert(trained.root, consolidated, to="consolidated", progress=None)
    convert(consolidated, via_full, **_flags(B_WORLD2_TP2), progress=None)
    runs = [(B_WORLD2_TP1, direct), (B_WORLD2_TP2, via_full)]
    results = run_distributed(load_and_step, 2, runs, trained.steps, timeout=600)[0]
    for (run, _), got in zip(runs, results):
        for name, want in trained.saved_params.items():
            assert torch.equal(got["loaded_params"][name], want), f"{run}: {name} not loaded bitwise"
        assert got["loss"] == pytest.approx(trained.next_loss, rel=1e-6), run
        for name, want in trained.next_params.items():
            diff = (got["params"][name].double() - want.double()).norm() / want.double().norm()
            assert diff <= 1e-6, f"{run}: {name} after the step differs by {diff:.1e} (relative)"
            assert not torch.equal(want, trained.saved_params[name]), f"{name} did not change in the step"


# pretrain_moe.py flags of the conftest model (mock data: the same samples in every layout).
PRETRAIN = [
    "--device", "cpu", "--mock-data", "--vocab-size", "300", "--seed", "7",
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "48",
    "--seq-length", "16", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--num-experts", "4", "--moe-ffn-hidden-size", "32", "--moe-router-topk", "2",
    "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001",
    "--micro-batch-size", "1", "--global-batch-size", "8", "--train-iters", "3", "--lr-decay-iters", "3",
    "--lr", "1e-2", "--lr-warmup-iters", "1", "--clip-grad", "0.5", "--log-interval", "1",
]  # fmt: skip


def _pretrain(rank, world, runs):
    os.environ["WORLD_SIZE"] = str(world)
    for argv in runs:
        assert pretrain_moe.main(argv) == 0, argv


def _weights(root: str) -> dict[str, torch.Tensor]:
    reader, _ = open_source(root, None)
    out = {}
    for _, names in stream_groups(list(reader.info.specs)):
        out.update({name: state["param"].clone() for name, state in reader.read(names).items()})
    reader.close()
    return out


def test_pretrain_moe_resumes_a_resharded_checkpoint_as_the_original(tmp_path):
    """Saved by pretrain_moe.py at iteration 2 in layout A, resumed with --load for iteration 3
    in A and, after conversion, in B: the same loss, grad norm and parameters."""
    a = ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2,1", "--use-distributed-optimizer"]
    b = ["--tensor-model-parallel-size", "1", "--expert-model-parallel-size", "1,2"]
    first, second = str(tmp_path / "a2"), str(tmp_path / "a3")
    runs = [
        PRETRAIN + a + ["--train-iters", "2", "--save", first],  # the later flag wins
        PRETRAIN + a + ["--load", first, "--save", second, "--log-json", str(tmp_path / "a.jsonl")],
    ]
    run_distributed(_pretrain, 4, runs, timeout=600)
    converted = str(tmp_path / "b2")
    convert(first, converted, **_flags(B_WORLD2_TP1), progress=None)
    b_runs = [
        PRETRAIN + b + ["--load", converted, "--save", str(tmp_path / "b3"), "--log-json", str(tmp_path / "b.jsonl")]
    ]
    run_distributed(_pretrain, 2, b_runs, timeout=600)
    want, got = (json.loads(open(tmp_path / f"{x}.jsonl").readlines()[-1]) for x in "ab")
    assert got["iteration"] == want["iteration"] == 3
    for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    want_params, got_params = _weights(second), _weights(str(tmp_path / "b3"))
    for name, w in want_params.items():
        diff = (got_params[name].double() - w.double()).norm() / w.double().norm()
        assert diff <= 1e-6, f"{name}: {diff:.1e}"
