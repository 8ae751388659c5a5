"""Pretrain an MoE GPT.  Run with torchrun, Megatron-style flags:

    torchrun --nproc-per-node 4 pretrain_moe.py --num-experts 4 --expert-model-parallel-size 2 \
        --tensor-model-parallel-size 2 --use-distributed-optimizer --swiglu --train-iters 50

With no --data-path and no --mock-data it trains on the built-in default corpus (Python's own
standard-library sources, tokenised on first use into cache/default_corpus).  Every flag is
validated before any process group is created (the data splits and checkpoints as soon as they
are opened, before the model is built); a bad combination prints one line
``pretrain_moe.py: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import sys

from megamoe.checkpointing.format import CheckpointError
from megamoe.training.arguments import ConfigError, parse_config


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
    except ConfigError as err:
        print(f"pretrain_moe.py: error: {err}", file=sys.stderr)
        return 2
    from megamoe.training.trainer import pretrain

    try:
        pretrain(cfg)
    except (ConfigError, CheckpointError) as err:
        print(f"pretrain_moe.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
