"""bench/check_fused_kernels.py, run as a user runs it: with ``--cpu-interpret`` it checks every
fused kernel on CPU through Triton's interpreter (the start-up check's cases and tolerances) and
reports each as passing, with its largest difference within the tolerance; without CUDA and
without the flag it says so and exits 0.  (The timing part needs CUDA: it is not run here.)"""

import json
import subprocess
import sys

import pytest
import torch

from tests.fixtures import REPO, script_env

SCRIPT = f"{REPO}/bench/check_fused_kernels.py"


def test_cpu_interpret_checks_every_kernel(tmp_path):
    pytest.importorskip("triton", reason="Triton is not installed (the gpu extra: pip install -e '.[gpu]')")
    out = subprocess.run([sys.executable, SCRIPT, "--cpu-interpret", "--json"], cwd=REPO, env=script_env(tmp_path),
                         capture_output=True, text=True, timeout=300, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["device"] == "cpu" and r["timings_moe_1b_4e_bf16"] == {}
    assert list(r["checks"]) == ["swiglu", "rotary", "cross_entropy", "moe"]
    for kernel, row in r["checks"].items():
        assert row["pass"] and row["why"] is None, (kernel, row)
        assert set(row["max_diff"]) == {"float32", "bfloat16"} and all(v <= 1 for v in row["tolerance_used"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for a machine without CUDA")
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT], cwd=REPO, env=script_env(tmp_path), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("no CUDA device:"), result
