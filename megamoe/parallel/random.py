"""Model-parallel RNG streams (Megatron's tracker), for dropout and router noise.

Two streams per process:

* the default stream, seeded with ``seed``: identical on every rank, so dropout on activations that are replicated over TP (the residual stream) draws the
  same mask on every TP rank;
* the ``model-parallel`` stream, seeded with ``seed + 2718 + tp_rank``: distinct
  on each TP rank, for dropout on TP-sharded activations (attention heads).

``fork()`` swaps the model-parallel stream in for the duration of a ``with`` block on the
current device's generator and restores the default one after, so the two never interleave.
Initialisation does not use these streams (see ``megamoe.parallel.params``).

The tracker belongs to the layout: every ``ParallelState`` carries its own (``layout.rng``), which
``model_parallel_seed`` seeds and the model's dropout, the recomputation and the checkpoint use.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megamoe.parallel.state import ParallelState

MODEL_PARALLEL_RNG = "model-parallel"
_OFFSET = 2718


class RNGStatesTracker:
    def __init__(self) -> None:
        self.states: dict[str, torch.Tensor] = {}
        self.device = torch.device("cpu")

    def reset(self) -> None:
        self.states = {}

    def _get_state(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set_state(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG stream {name!r} already exists")
        saved = self._get_state()
        self._manual_seed(seed)
        self.states[name] = self._get_state()
        self._set_state(saved)

    def _manual_seed(self, seed: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self.states:
            raise ValueError(f"RNG stream {name!r} was not set; call model_parallel_seed first")
        saved = self._get_state()
        self._set_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = self._get_state()
            self._set_state(saved)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {name: state.clone() for name, state in states.items()}


def model_parallel_stream_seed(seed: int, tp_rank: int) -> int:
    """Seed of the model-parallel stream of TP rank ``tp_rank`` in a run seeded with ``seed``."""
    return seed + _OFFSET + tp_rank


def model_parallel_seed(seed: int, layout: ParallelState, device: torch.device | None = None) -> None:
    """Seed the default streams and ``layout.rng``'s model-parallel stream of ``layout``'s rank."""
    tracker = layout.rng
    tracker.reset()
    tracker.device = device or torch.device("cpu")
    torch.manual_seed(seed)
    if tracker.device.type == "cuda":
        torch.cuda.manual_seed(seed)
    tracker.add(MODEL_PARALLEL_RNG, model_parallel_stream_seed(seed, layout.tp_rank))
