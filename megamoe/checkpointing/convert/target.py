"""The topology a conversion writes for (``--target-*`` flags), checked against the model.

A version 2 checkpoint loads into any layout; the target topology only decides the RNG states
each rank continues from and what ``metadata.json`` records as the saving layout
(``sharded_writer``).
"""

from __future__ import annotations

import dataclasses

from megamoe.checkpointing.format import SavedTopology
from megamoe.model.config import ModelConfig
from megamoe.parallel.state import validate_parallel_sizes


def target_topology(
    config: ModelConfig,
    *,
    world_size: int,
    tensor_model_parallel_size: int,
    expert_model_parallel_size: tuple[int, ...],
    use_distributed_optimizer: bool,
    expert_tensor_parallel_size: int | None = None,
) -> tuple[SavedTopology, ModelConfig]:
    """The target ``SavedTopology`` and the model config with its EP sizes (one value, or one per MoE
    layer).  ``expert_tensor_parallel_size`` None means TP; an ETP other than TP needs sequence
    parallelism in training, so the target topology records it on (it moves no parameter).
    Raises ``ValueError`` naming the flags and the numbers if the layout cannot hold the model."""
    eps = tuple(expert_model_parallel_size) or (1,)
    etp = tensor_model_parallel_size if expert_tensor_parallel_size is None else expert_tensor_parallel_size
    sequence_parallel = etp != tensor_model_parallel_size
    where = (
        f"world {world_size}, TP {tensor_model_parallel_size}, EP {list(expert_model_parallel_size)}, "
        f"ETP {etp}, ZeRO-1 {'on' if use_distributed_optimizer else 'off'}"
    )
    try:
        if not config.moe_layers and eps != (1,):
            raise ValueError(f"--expert-model-parallel-size {list(eps)} was given but the model has no MoE layers")
        target = dataclasses.replace(config, expert_model_parallel_size=eps)
        validate_parallel_sizes(
            world_size=world_size,
            tensor_model_parallel_size=tensor_model_parallel_size,
            expert_model_parallel_sizes=target.moe_ep_sizes(),
            expert_tensor_parallel_size=etp,
            sequence_parallel=sequence_parallel,
        )
        target.check_parallel_layout(
            tensor_model_parallel_size=tensor_model_parallel_size,
            data_parallel_size=world_size // tensor_model_parallel_size,
            expert_tensor_parallel_size=etp,
            sequence_parallel=sequence_parallel,
        )
    except ValueError as err:
        message = (
            str(err)
            .replace("--tensor-model-parallel-size", "--target-tensor-parallel-size")
            .replace("--expert-model-parallel-size", "--target-expert-parallel-size")
            .replace("--expert-tensor-parallel-size", "--target-expert-tensor-parallel-size")
            .replace("the world size", "--target-world-size")
        )
        raise ValueError(f"the target layout ({where}) does not fit the model: {message}") from None
    topology = SavedTopology(
        world_size=world_size,
        tensor_model_parallel_size=tensor_model_parallel_size,
        expert_model_parallel_size=target.moe_ep_sizes(),
        use_distributed_optimizer=use_distributed_optimizer,
        expert_tensor_parallel_size=etp,
        sequence_parallel=sequence_parallel,
    )
    return topology, target
