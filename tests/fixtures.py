"""What several test modules share, in one place (test modules never import each other).

* ``REPO``: the repository root (the tools and ``pretrain_moe.py`` run from it).
* ``TINY_MOE``: the command line of the tiny MoE every end-to-end test trains (2 layers, hidden 32,
  4 experts top-2, mock data, sequence 16, global batch 8).
* ``run_main``: a ``run_distributed`` body that runs ``pretrain_moe.main`` once per argv.
* ``read_json_log``: the records of a ``--log-json`` file.
"""

from __future__ import annotations

import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MOE = [
    "--device", "cpu", "--mock-data", "--vocab-size", "200",
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "48",
    "--seq-length", "16", "--swiglu", "--disable-bias-linear",
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001",
    "--micro-batch-size", "2", "--global-batch-size", "8",
    "--lr", "1e-2", "--lr-warmup-iters", "1", "--clip-grad", "0.5", "--log-interval", "1", "--seed", "7",
]


def read_json_log(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_main(rank, world, runs):
    """Run pretrain_moe.main once per argv in ``runs`` inside one set of processes."""
    import pretrain_moe

    os.environ["WORLD_SIZE"] = str(world)
    for argv in runs:
        code = pretrain_moe.main(argv)
        assert code == 0, f"main exited with {code}"
