"""Pretrain an MoE GPT.  Run with torchrun, Megatron-style flags:

    torchrun --nproc-per-node 4 pretrain_moe.py --num-experts 4 --expert-model-parallel-size 2 \
        --tensor-model-parallel-size 2 --use-distributed-optimizer --swiglu --train-iters 50

With no --data-path and no --mock-data it trains on the built-in default corpus (Python's own
standard-library sources, tokenised on first use into cache/default_corpus).  Every flag is
validated before any process group is created (the data splits and checkpoints as soon as they
are opened, before the model is built); a bad combination prints one line
``pretrain_moe.py: error: ...`` (on rank 0 only) and exits with status 2.  A NaN/inf loss or
gradient stops the run with one such line and status 1; Ctrl-C stops it with one line and
status 130 (``megamoe/training/exits.py``).
"""

from __future__ import annotations

import sys

from megamoe.training.exits import outcome, print_once, sigint_stops

PROG = "pretrain_moe.py"


def main(argv: list[str] | None = None) -> int:
    with sigint_stops():  # before torch is imported: a Ctrl-C during start-up is clean too
        try:
            from megamoe.training.arguments import parse_config
            from megamoe.training.trainer import pretrain

            pretrain(parse_config(argv))
            return 0
        except BaseException as err:  # sorted by outcome(); a bug, --help or sys.exit is re-raised
            ended = outcome(err)
            if ended is None:
                raise
    code, line = ended
    print_once(PROG, line)
    return code


if __name__ == "__main__":
    sys.exit(main())
