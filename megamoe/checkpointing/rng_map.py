"""Which saved RNG states a rank of another layout continues from.

RNG states are per rank: the default streams are seeded alike on every rank, the model-parallel
stream per TP rank (``megamoe.parallel.random``).  A rank at (pipeline rank ``p``, DP rank ``d``,
TP rank ``t``) takes the states of the saved rank at the same coordinates; a pipeline or DP rank
the saved layout did not have takes those of pipeline or DP rank 0; a TP rank it did not have
takes pipeline rank 0's, DP rank 0's states with a fresh model-parallel stream: the one a new run
would have given TP rank ``t``.
"""

from __future__ import annotations

import torch

from megamoe.parallel.random import model_parallel_stream_seed

_CUDA_RNG_STATE_BYTES = 16  # torch.cuda.get_rng_state(): seed and offset, 8 bytes each


def rng_source(*, saved_pp: int, saved_dp: int, saved_tp: int, pp_rank: int, dp_rank: int,
               tp_rank: int) -> tuple[int, int, int, bool]:
    """``(pp, dp, tp, fresh)``: the saved coordinates whose states rank (``pp_rank``, ``dp_rank``,
    ``tp_rank``) takes, and whether its model-parallel stream must be replaced by a fresh one."""
    if tp_rank < saved_tp:
        return (pp_rank if pp_rank < saved_pp else 0), (dp_rank if dp_rank < saved_dp else 0), tp_rank, False
    return 0, 0, 0, True


def _fresh_stream(like: torch.Tensor, seed: int) -> torch.Tensor:
    """An RNG state of ``like``'s kind (CPU Mersenne Twister, or CUDA Philox seed + offset) seeded by ``seed``."""
    if like.numel() == _CUDA_RNG_STATE_BYTES:
        return torch.tensor([seed, 0], dtype=torch.int64).view(torch.uint8)
    return torch.Generator().manual_seed(seed).get_state()


def with_fresh_stream(states: dict, *, seed: int, tp_rank: int) -> dict:
    """``states`` (one rank's saved RNG states) with the model-parallel streams of TP rank ``tp_rank``."""
    out = dict(states)
    stream_seed = model_parallel_stream_seed(seed, tp_rank)
    out["tracker"] = {name: _fresh_stream(s, stream_seed) for name, s in states["tracker"].items()}
    return out


def target_rng(source: list[list[list[dict]]], pp_rank: int, dp_rank: int, tp_rank: int, seed: int) -> dict:
    """RNG states of the rank at (``pp_rank``, ``dp_rank``, ``tp_rank``) from the saved
    ``source[pp][dp][tp]``."""
    pp, dp, tp, fresh = rng_source(saved_pp=len(source), saved_dp=len(source[0]), saved_tp=len(source[0][0]),
                                   pp_rank=pp_rank, dp_rank=dp_rank, tp_rank=tp_rank)
    return with_fresh_stream(source[pp][dp][tp], seed=seed, tp_rank=tp_rank) if fresh else source[pp][dp][tp]
