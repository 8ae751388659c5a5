"""ParallelConfig: the parallel layout a run asks for, as its flags give it.

Each field declares its flag (``megamoe.flags``).  This is only the request: every size,
and which sizes combine with each other, with the world and with the model's experts, is checked,
and the derived sizes (the ETP default, the EP size of each MoE layer) are worked out, once, by
``megamoe.parallel.state.validate_parallel_layout`` (``build_parallel_state`` calls it).
"""

from __future__ import annotations

from dataclasses import dataclass

from megamoe.flags import derived, flag
from megamoe.int_list import IntListAction


@dataclass
class ParallelConfig:
    world_size: int = derived(1, help="WORLD_SIZE from torchrun")
    tensor_model_parallel_size: int = flag(1, help="TP: ranks that split each layer's matrices")
    sequence_parallel: bool = flag(False, help="split the activations outside the TP GEMMs (norms, dropout, "
                                   "residuals, routing) along the sequence over TP; needs TP > 1")
    expert_model_parallel_size: tuple[int, ...] = flag(
        (1,), action=IntListAction, help="EP: ranks that split each MoE layer's experts; one value, or one per "
                                         "MoE layer (space- or comma-separated)")
    expert_tensor_parallel_size: int | None = flag(
        None, help="ETP: ranks that split each expert; the EP groups are formed from the other ranks, "
        "so EP x ETP may span TP and DP (ETP other than TP needs --sequence-parallel)",
        default_text="--tensor-model-parallel-size",
    )
    elastic: bool = flag(False, help="an elastic run (torchrun --nnodes MIN:MAX): in a world where an "
                         "--expert-model-parallel-size no longer fits, use the largest EP size not above it that "
                         "divides the world and the experts (logged) instead of refusing the layout")

    def __post_init__(self) -> None:
        self.expert_model_parallel_size = tuple(int(e) for e in self.expert_model_parallel_size) or (1,)

    @property
    def data_parallel_size(self) -> int:
        """DP: the world over TP (``validate_parallel_layout`` checks that TP divides it)."""
        return self.world_size // self.tensor_model_parallel_size
