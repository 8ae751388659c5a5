"""bench/bench_pipeline.py runs megamoe's pipeline training step (as a user runs it, 4 gloo
processes) and its counted figures are the schedules' theory: each stage holds the activations
of P - s micro-batches under 1F1B (P on the first) and P + (P - 1) / V on the first under
interleaving, and sends one [b, s, h] tensor per chunk boundary per micro-batch, [b, s / TP, h]
with sequence parallelism.  The idle fractions are timings: only their range is checked, and the
printed bubble against its formula."""

import subprocess
import sys

from tests.fixtures import REPO, script_env

WORLD, M, B, S, H = 4, 8, 1, 8, 32


def _table(tmp_path) -> list[dict]:
    argv = ["--stages", str(WORLD), "--sp-tp", "2", "--micro-batches", str(M), "--virtual", "1", "2",
            "--micro-batch-size", str(B), "--seq-length", str(S), "--hidden-size", str(H), "--forward-ms", "1",
            "--backward-ms", "2", "--steps", "1"]
    out = subprocess.run([sys.executable, "bench/bench_pipeline.py", *argv], cwd=REPO, env=script_env(tmp_path),
                         capture_output=True, text=True, timeout=600, check=True).stdout
    lines = out.splitlines()
    header = lines[1].split()
    return [{k: (v if k == "schedule" else float(v)) for k, v in zip(header, line.split())} for line in lines[2:]]


def test_pipeline_bench_prints_the_schedules_theory(tmp_path):
    rows = _table(tmp_path)
    layouts = sorted({(int(r["P"]), int(r["TP"]), int(r["V"])) for r in rows})
    assert layouts == [(2, 2, 1), (4, 1, 1), (4, 1, 2)]
    assert len(rows) == WORLD * len(layouts)  # one row per rank
    for r in rows:
        p, tp, m, v, s = int(r["P"]), int(r["TP"]), int(r["m"]), int(r["V"]), int(r["stage"])
        one = B * S * H * 4 // tp
        assert r["schedule"] == ("1F1B" if v == 1 else "interleaved")
        assert r["bubble"] == round((p - 1) / (v * m + p - 1), 3), r
        assert 0 <= r["idle"] <= 1, r
        if v == 1:
            assert r["held"] == r["held_theory"] == min(p - s, m), r
        else:
            assert r["held"] == r["held_theory"] == min((v - 1) * p + 2 * (p - 1 - s) + 1, v * m) / v, r
        assert r["p2p_fwd"] == r["p2p_fwd_theory"] == one * (v - (s == p - 1)), r
        assert r["p2p_bwd"] == r["p2p_bwd_theory"] == one * (v - (s == 0)), r
    first = {(int(r["P"]), int(r["V"])): r["held"] for r in rows if r["stage"] == 0}
    assert first[(4, 1)] == 4 and first[(4, 2)] == 4 + 3 / 2 and first[(2, 1)] == 2
