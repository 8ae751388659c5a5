"""ParallelConfig: the parallel layout a run asks for, as its flags give it.

Each field declares its flag (``megamoe.flags``).  This is only the request: every size,
and which sizes combine with each other, with the world and with the model's experts, is checked,
and the derived sizes (the ETP default, the EP size of each MoE layer) are worked out, once, by
``megamoe.parallel.layout_rules.validate_parallel_layout`` (``build_parallel_state`` calls it).
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
    pipeline_model_parallel_size: int = flag(
        1, help="PP: pipeline stages, the outermost dimension (global rank = pp_rank x world / PP + rank in the "
        "stage); each stage holds consecutive layers and runs TP, DP, EP and ETP over its own world / PP ranks")
    virtual_pipeline_model_parallel_size: int | None = flag(
        None, help="V: model chunks per pipeline stage, run by the interleaved 1F1B schedule (each stage's layers "
        "cut into V equal chunks)", default_text="1")
    num_layers_per_virtual_pipeline_stage: int | None = flag(
        None, help="layers of each model chunk of the interleaved schedule (another way to give V)")
    decoder_first_pipeline_num_layers: int | None = flag(
        None, help="layers of the first pipeline stage (uneven stages; the others split the rest evenly)",
        default_text="an even split")
    decoder_last_pipeline_num_layers: int | None = flag(
        None, help="layers of the last pipeline stage (uneven stages; the others split the rest evenly)",
        default_text="an even split")
    elastic: bool = flag(False, help="an elastic run (torchrun --nnodes MIN:MAX): in a world where an "
                         "--expert-model-parallel-size no longer fits, use the largest EP size not above it that "
                         "divides a pipeline stage's ranks (world / PP) and the experts (logged) instead of refusing the "
                         "layout; PP and TP are kept, DP follows the world")

    pipeline_num_layers: int | None = derived(
        None, help="--num-layers: what the pipeline stages split (None: not checked)")
    pipeline_num_microbatches: int | None = derived(
        None, help="micro-batches per rank per step: what the pipeline schedule takes (None: not checked)")

    def __post_init__(self) -> None:
        self.expert_model_parallel_size = tuple(int(e) for e in self.expert_model_parallel_size) or (1,)

    @property
    def data_parallel_size(self) -> int:
        """DP: a stage's world over TP (``validate_parallel_layout`` checks that PP x TP divides the world)."""
        return self.stage_world_size // self.tensor_model_parallel_size

    @property
    def stage_world_size(self) -> int:
        """The ranks of one pipeline stage: the world over PP."""
        return self.world_size // self.pipeline_model_parallel_size
