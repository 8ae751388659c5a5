"""bench/bench_sequence_parallel.py runs and shows what sequence parallelism promises: each token
crosses the all-to-all once (the dispatch bytes are those of the routing, and over the TP ranks
they add up to 1/TP of the bytes without it), and the residual-stream activations saved for
backward fall by TP.  The bench prints the figures; this only checks them."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_sequence_parallel.py"


def test_sequence_parallel_bench_counts_fall_by_tp():
    spec = importlib.util.spec_from_file_location("bench_sequence_parallel", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main([])
    by = {(r["layout"], r["rank"], r["layer"]): r for r in rows}
    for row in rows:
        assert row["dispatch"] == row["dispatch_analytic"], row
        assert row["saved_bsh"] == row["bsh_analytic"], row
    for (layout, rank, layer), row in by.items():
        if layout != "TP2":
            assert row["saved_bsh"] * bench.TP == by[("TP2", rank, layer)]["saved_bsh"], (layout, rank, layer)
    total = {name: sum(r["dispatch"] for r in rows if r["layout"] == name) for name, *_ in bench.LAYOUTS}
    assert 0.8 < total["TP2+SP"] * bench.TP / total["TP2"] < 1.25, total
