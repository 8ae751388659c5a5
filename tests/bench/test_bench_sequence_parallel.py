"""bench/bench_sequence_parallel.py runs and shows what sequence parallelism promises: each token
crosses the all-to-all once (the dispatch bytes are those of the routing, and over the TP ranks
they add up to 1/TP of the bytes without it), and the residual-stream activations saved for
backward fall by TP.  The bench prints the figures (run as a script, as a user would); this only
checks them."""

import subprocess
import sys
from pathlib import Path

from tests.fixtures import script_env

ROOT = Path(__file__).resolve().parents[2]
TP = 2


def test_sequence_parallel_bench_counts_fall_by_tp(tmp_path):
    out = subprocess.run([sys.executable, "bench/bench_sequence_parallel.py"], cwd=ROOT, env=script_env(tmp_path),
                         capture_output=True, text=True, timeout=600, check=True).stdout
    lines = out.splitlines()
    header = lines[1].split()
    rows = [dict(zip(header, line.split())) for line in lines[2:] if line.strip()]
    rows = [{k: (v if k == "layout" else int(v)) for k, v in r.items()} for r in rows]
    assert {r["layout"] for r in rows} == {"TP2", "TP2+SP", "TP2+SP+ETP1"}
    by = {(r["layout"], r["rank"], r["layer"]): r for r in rows}
    for row in rows:
        assert row["dispatch"] == row["dispatch_analytic"], row
        assert row["saved_bsh"] == row["bsh_analytic"], row
        if row["layout"] != "TP2":
            assert row["saved_bsh"] * TP == by[("TP2", row["rank"], row["layer"])]["saved_bsh"], row
    total = {name: sum(r["dispatch"] for r in rows if r["layout"] == name) for name in ("TP2", "TP2+SP")}
    assert 0.8 < total["TP2+SP"] * TP / total["TP2"] < 1.25, total
