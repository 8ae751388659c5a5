"""bench/bench_pipeline.py runs (as a user runs it, P gloo processes) and its counted figures are the
schedules' theory: each stage holds the activations of P - s micro-batches under 1F1B (P on the
first) and P + (P - 1) / V on the first under interleaving, and sends one [b, s, h] tensor per
chunk boundary per micro-batch.  The idle fractions are timings: only their range is checked,
and the printed bubble against its formula."""

import subprocess
import sys

from tests.fixtures import REPO, script_env

P, B, S, H = 3, 1, 8, 16


def _table(tmp_path) -> list[dict]:
    argv = ["--stages", str(P), "--micro-batches", "3", "6", "--virtual", "1", "2", "--micro-batch-size", str(B),
            "--seq-length", str(S), "--hidden-size", str(H), "--forward-ms", "1", "--backward-ms", "2", "--steps", "1"]
    out = subprocess.run([sys.executable, "bench/bench_pipeline.py", *argv], cwd=REPO, env=script_env(tmp_path),
                         capture_output=True, text=True, timeout=300, check=True).stdout
    lines = out.splitlines()
    header = lines[1].split()
    return [{k: (v if k == "schedule" else float(v)) for k, v in zip(header, line.split())} for line in lines[2:]]


def test_pipeline_bench_prints_the_schedules_theory(tmp_path):
    rows = _table(tmp_path)
    assert sorted((r["m"], r["V"], r["stage"]) for r in rows) == [
        (m, v, s) for m in (3, 6) for v in (1, 2) for s in range(P)]
    one = B * S * H * 4
    for r in rows:
        m, v, s = int(r["m"]), int(r["V"]), int(r["stage"])
        assert r["schedule"] == ("1F1B" if v == 1 else "interleaved")
        assert r["bubble"] == round((P - 1) / (v * m + P - 1), 3), r
        assert 0 <= r["idle"] <= 1, r
        if v == 1:
            assert r["held"] == r["held_theory"] == min(P - s, m), r
        else:
            assert r["held"] == r["held_theory"] == min((v - 1) * P + 2 * (P - 1 - s) + 1, v * m) / v, r
        assert r["p2p_fwd"] == r["p2p_fwd_theory"] == one * (v - (s == P - 1)), r
        assert r["p2p_bwd"] == r["p2p_bwd_theory"] == one * (v - (s == 0)), r
    first = {(int(r["m"]), int(r["V"])): r["held"] for r in rows if r["stage"] == 0}
    assert first[(6, 1)] == P and first[(6, 2)] == P + (P - 1) / 2
