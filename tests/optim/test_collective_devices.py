"""Every tensor the optimizer hands to a collective is on the model's device, on every rank.

NCCL refuses CPU tensors, and gloo accepts them, so on a CPU machine the mistake is invisible
unless the model lives on a device other than "cpu".  Here it lives on "meta" and the
collectives are replaced by a recorder that notes each tensor's device and moves no data (meta
tensors have none; the grad-norm table reads back as zeros, wherever it is).  The layouts include ranks that own
no gradient of a part, and ranks that own none at all (without ZeRO-1 only DP rank 0 owns the
dense part and only EDP rank 0 the experts), where a CPU fallback would show.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megamoe.model.gpt import GPTModel
from megamoe.optim import MixedPrecisionOptimizer, OptimizerConfig
from tests.harness import init_layout, run_distributed
from tests.tiny_moe import HYPER, model_config

COLLECTIVES = (
    "all_reduce", "reduce_scatter_single", "reduce_scatter_tensor", "all_gather_single", "all_gather_into_tensor",
    "all_gather", "all_to_all_single", "broadcast", "reduce", "gather", "scatter",
)
# (TP, EP per MoE layer, ZeRO-1, bucket size); tiny buckets give ZeRO-1 ranks that own only padding.
LAYOUTS = [
    (1, (2, 2), False, 40_000_000),
    (2, (1, 1), False, 40_000_000),
    (1, (4, 2), True, 40_000_000),
    (2, (2, 2), True, 64),
]


class _Done:
    def wait(self) -> None:
        pass


@contextlib.contextmanager
def recorded_collectives(calls: list):
    """Replace the collectives with recorders appending (name, [tensor devices]) to ``calls``."""
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    saved_tolist = torch.Tensor.tolist

    def recorder(name):
        def record(*args, async_op=False, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            calls.append((name, [str(t.device) for t in tensors]))
            for t in tensors:  # a tensor off the model's device still reads back as zeros, as meta ones do
                if not t.is_meta:
                    t.zero_()
            return _Done() if async_op else None

        return record

    def tolist(tensor):
        return torch.zeros(tensor.shape, dtype=tensor.dtype).tolist() if tensor.is_meta else saved_tolist(tensor)

    for name in saved:
        setattr(dist, name, recorder(name))
    torch.Tensor.tolist = tolist
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
        torch.Tensor.tolist = saved_tolist


def _devices_body(rank, world):
    out = []
    for tp, eps, zero, bucket in LAYOUTS:
        config = model_config()
        layout = init_layout(tp, eps, experts_by_layer=config.experts_by_layer())
        model = GPTModel(config, layout, device=torch.device("meta"))
        opt = MixedPrecisionOptimizer(
            model, OptimizerConfig(**{**HYPER, "use_distributed_optimizer": zero, "bucket_size": bucket}), layout
        )
        calls = []
        with recorded_collectives(calls):
            opt.zero_grad()
            opt.step()
        owned = {part: len(views) for part, views in opt._norm_masters.items()}
        out.append(((tp, eps, zero), calls, owned))
    return out


def test_every_tensor_in_a_collective_is_on_the_model_device_on_every_rank():
    results = run_distributed(_devices_body, 4)
    owns_nothing = 0
    for index, (tp, eps, zero, _) in enumerate(LAYOUTS):
        where = f"TP={tp} EP={eps} ZeRO={zero}"
        per_rank = [results[rank][index] for rank in range(4)]
        if not zero:
            assert any(0 in owned.values() for _, _, owned in per_rank), f"{where}: some rank must own no part"
        owns_nothing += sum(not any(owned.values()) for _, _, owned in per_rank)
        for rank, (_, calls, _) in enumerate(per_rank):
            assert any(name.startswith("all_gather") for name, _ in calls), f"{where}: the norm's all_gather ran"
            for name, devices in calls:
                assert devices and set(devices) == {"meta"}, f"{where} rank {rank}: {name} got tensors on {devices}"
    assert owns_nothing, "some rank of some layout must own no gradient at all"
