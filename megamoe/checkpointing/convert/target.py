"""The topology a conversion writes for (``--target-*`` flags), checked against the model.

A version 2 checkpoint loads into any layout; the target topology only decides the RNG states
each rank continues from and what ``metadata.json`` records as the saving layout
(``sharded_writer``).
"""

from __future__ import annotations

from megamoe.checkpointing.format import SavedTopology
from megamoe.model.config import ModelConfig
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.layout_rules import resolved_expert_tensor_parallel_size, validate_parallel_layout


def target_topology(
    config: ModelConfig,
    *,
    world_size: int,
    tensor_model_parallel_size: int,
    expert_model_parallel_size: tuple[int, ...],
    use_distributed_optimizer: bool,
    expert_tensor_parallel_size: int | None = None,
    pipeline_model_parallel_size: int = 1,
) -> SavedTopology:
    """The target ``SavedTopology`` of ``config``'s model with EP sizes
    ``expert_model_parallel_size`` (one value, or one per MoE layer).
    ``expert_tensor_parallel_size`` None means TP; an ETP other than TP needs sequence
    parallelism in training, so the target topology records it on (it moves no parameter).
    ``pipeline_model_parallel_size`` must divide the world with TP, EP and ETP inside each stage;
    how the stages split the layers is not checked (any split loads the checkpoint, uneven ones
    included).  Raises ``ValueError`` naming the flags and the numbers if the layout cannot hold the model."""
    parallel = ParallelConfig(
        world_size=world_size, tensor_model_parallel_size=tensor_model_parallel_size,
        expert_model_parallel_size=tuple(expert_model_parallel_size),
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    etp = resolved_expert_tensor_parallel_size(parallel)
    parallel.sequence_parallel = etp != tensor_model_parallel_size
    where = (
        f"world {world_size}, PP {pipeline_model_parallel_size}, TP {tensor_model_parallel_size}, "
        f"EP {list(parallel.expert_model_parallel_size)}, ETP {etp}, "
        f"ZeRO-1 {'on' if use_distributed_optimizer else 'off'}"
    )
    try:
        ep_by_layer = validate_parallel_layout(parallel, config.experts_by_layer())
        config.check_tensor_parallel(tensor_model_parallel_size=tensor_model_parallel_size,
                                     expert_tensor_parallel_size=etp)
    except ValueError as err:
        message = (
            str(err)
            .replace("--tensor-model-parallel-size", "--target-tensor-parallel-size")
            .replace("--expert-model-parallel-size", "--target-expert-parallel-size")
            .replace("--expert-tensor-parallel-size", "--target-expert-tensor-parallel-size")
            .replace("--pipeline-model-parallel-size", "--target-pipeline-model-parallel-size")
            .replace("the world size", "--target-world-size")
        )
        raise ValueError(f"the target layout ({where}) does not fit the model: {message}") from None
    return SavedTopology(
        world_size=world_size,
        tensor_model_parallel_size=tensor_model_parallel_size,
        expert_model_parallel_size=tuple(ep_by_layer[layer] for layer in sorted(ep_by_layer)),
        use_distributed_optimizer=use_distributed_optimizer,
        expert_tensor_parallel_size=etp,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
