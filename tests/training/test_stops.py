"""How a run that does not finish ends, as a user sees it in real processes: one line, printed
once, an exit status, and no traceback from megamoe.

* a NaN/inf loss or gradient stops a bf16 or fp32 run naming the iteration (Megatron's
  --check-for-nan-in-loss-and-grad, on by default); --no-check-for-nan-in-loss-and-grad skips
  the steps instead; fp16 skips an overflowing step (the loss scaler) and trains on;
* Ctrl-C stops with one line (status 130), alone or under torchrun; with --exit-signal-handler
  it saves first, as on SIGTERM (tested at PP 2 x EP 2 under torchrun: the SIGTERM reaches one
  worker of the last stage, and every rank saves and exits 0);
* a bad flag under torchrun is printed once (rank 0), with a non-zero status.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from megamoe.parallel.local_nodes import child_pids
from tests.fixtures import REPO, TINY_MOE, read_json_log

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pretrain_moe.py", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)


def _torchrun(*args: str, nproc: int = 2, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         "pretrain_moe.py", *args],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _no_stack_of_ours(output: str) -> None:
    """No traceback frame from megamoe or pretrain_moe.py, and no KeyboardInterrupt."""
    frames = [line for line in output.splitlines() if re.match(r'\s*File ".*(megamoe/|pretrain_moe\.py)', line)]
    assert not frames and "KeyboardInterrupt" not in output, output


# An lr this large makes the first update overflow the next step: iteration 2's gradients (or loss) are inf/NaN.
DIVERGES = TINY_MOE + ["--train-iters", "4", "--lr", "1e30", "--clip-grad", "0"]


def test_a_nan_loss_stops_a_bf16_or_fp32_run_naming_the_iteration(tmp_path):
    for precision in ([], ["--bf16"]):
        result = _run(*DIVERGES, *precision)
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert re.fullmatch(r"pretrain_moe.py: error: iteration 2: (the loss|a gradient) is NaN or inf \(on ranks "
                            r"\[0\].*\); stopping \(--no-check-for-nan-in-loss-and-grad skips such steps instead\)\n",
                            result.stderr), result.stderr
    log = tmp_path / "log.jsonl"
    result = _run(*DIVERGES, "--no-check-for-nan-in-loss-and-grad", "--log-json", str(log))
    assert result.returncode == 0, result.stderr
    assert read_json_log(log)[-1]["skipped_iters"] == 3  # iterations 2-4: non-finite, not applied


def test_fp16_skips_an_overflowing_step_and_trains_on(tmp_path):
    log = tmp_path / "log.jsonl"
    # The default initial loss scale 2^32 overflows fp16 gradients: the first steps are skipped.
    result = _run(*TINY_MOE, "--train-iters", "4", "--fp16", "--hysteresis", "1", "--log-json", str(log))
    assert result.returncode == 0, result.stderr
    records = read_json_log(log)
    assert records[0]["skipped_iters"] >= 1 and records[-1]["loss_scale"] < 2.0**32, records


def _wait_for_iterations(log, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(read_json_log(log)) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"the run did not log {n} iterations: {proc.communicate()}")


def test_ctrl_c_stops_with_one_line(tmp_path):
    log = tmp_path / "log.jsonl"
    proc = subprocess.Popen([sys.executable, "pretrain_moe.py", *TINY_MOE, "--train-iters", "100000",
                             "--log-json", str(log)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_iterations(log, 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert re.fullmatch(r"pretrain_moe.py: interrupted \(SIGINT\) after iteration \d+: stopped without saving "
                        r"\(--exit-signal-handler saves a checkpoint first\)\n", err), err


def _rank_of(pid: int) -> int:
    with open(f"/proc/{pid}/environ") as f:
        return int(dict(v.split("=", 1) for v in f.read().split("\0") if "=" in v)["RANK"])


@pytest.mark.parametrize("sig,layout", [
    (signal.SIGINT, []),  # Ctrl-C in a terminal, one process
    (signal.SIGTERM, ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"]),  # 4 ranks
], ids=["sigint-one-process", "sigterm-pp2-ep2-torchrun"])
def test_a_signal_with_exit_signal_handler_saves_then_stops(tmp_path, sig, layout):
    log, save = tmp_path / "log.jsonl", tmp_path / "ckpt"
    argv = [*TINY_MOE, *layout, "--train-iters", "100000", "--log-json", str(log), "--save", str(save),
            "--exit-signal-handler"]
    if layout:
        proc = _torchrun(*argv, nproc=4)
    else:
        proc = subprocess.Popen([sys.executable, "pretrain_moe.py", *argv], cwd=REPO, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_iterations(log, 2, proc)
    if layout:  # one worker of the last stage only: the ranks agree on the stop
        workers = {_rank_of(pid): pid for pid in child_pids(proc.pid)}
        os.kill(workers[3], sig)
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and not err, err or out
    stopped = re.findall(rf"{sig.name} received: saving at iteration (\d+) and exiting", out)
    assert len(stopped) == 1, out
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == stopped[0]
    assert [r["iteration"] for r in read_json_log(log)][-1] == int(stopped[0])


def test_ctrl_c_under_torchrun_is_one_line_from_rank_0(tmp_path):
    """Ctrl-C in a terminal reaches the whole process group: torchrun and both workers (torchrun
    forwards it as well)."""
    log = tmp_path / "log.jsonl"
    proc = _torchrun(*TINY_MOE, "--train-iters", "100000", "--expert-model-parallel-size", "2",
                     "--log-json", str(log), start_new_session=True)
    _wait_for_iterations(log, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    assert out.count("pretrain_moe.py: interrupted (SIGINT)") == 1, out
    _no_stack_of_ours(out)


def test_a_start_up_error_under_torchrun_is_printed_once():
    proc = _torchrun(*TINY_MOE, "--num-layer", "2")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out
    ours = [line for line in out.splitlines() if "pretrain_moe.py: error:" in line]
    assert ours == ["pretrain_moe.py: error: unrecognized argument: --num-layer (did you mean --num-layers?); "
                    "see --help"], out
    _no_stack_of_ours(out)
