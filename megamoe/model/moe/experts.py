"""This rank's experts, stacked, computed with one grouped GEMM per projection.

Shapes: ``N`` rows for the local experts (local-expert-major, ``counts[l]`` rows each), ``H``
hidden, ``L`` local experts, ``F`` = ``--moe-ffn-hidden-size / ETP`` (``--expert-tensor-parallel-size``,
by default the attention TP size).

Weights follow the dense MLP's layout (``[out, in]`` per expert) with the experts stacked on dim 0,
so one expert's full tensor is exactly a dense ``MLP``'s:

    fc1  [L, 2, F, H]  (SwiGLU: gate then up; TP-sharded on dim 2)   or  [L, F, H] (GeLU; dim 1)
    fc2  [L, H, F]     (TP-sharded on dim 2)

and, with biases (``add_bias_linear``), ``fc1_bias`` ``[L, 2, F]`` / ``[L, F]`` (ETP-sharded like
fc1) and ``fc2_bias`` ``[L, H]`` (replicated over ETP, like a RowParallelLinear bias).  For an
expert parameter ``tensor_parallel_dim`` names the dim split over the ETP group.

Each expert is tensor-parallel like the dense MLP (fc1 column-parallel, fc2 row-parallel) over
the ETP group: the output is this ETP rank's partial sum, which the MoE layer (ETP = TP) or the
dispatcher (sequence parallelism) reduces once for all experts.
``torch._grouped_mm(x [N, in], w.transpose(-2, -1) [L, in, out], offs)`` reads the stored
weights through a transposed view, without a copy.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from megamoe.model.config import ModelConfig
from megamoe.model.mlp import activation
from megamoe.parallel.mappings import copy_to_group
from megamoe.parallel.params import tag_param
from megamoe.parallel.state import ParallelState

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALIGNMENT_BYTES = 16


@lru_cache(maxsize=None)
def _grouped_mm_runs(device_type: str, device_index: int | None, dtype: torch.dtype) -> bool:
    """Whether this build's ``torch._grouped_mm`` runs on the device for ``dtype`` (probed once)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    x = torch.zeros(8, 16, dtype=dtype, device=device)
    w = torch.zeros(2, 16, 16, dtype=dtype, device=device)
    offs = torch.tensor([4, 8], dtype=torch.int32, device=device)
    try:
        torch._grouped_mm(x, w, offs=offs)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def grouped_mm_supported(x_NI: torch.Tensor, w_LIO: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm(x_NI, w_LIO, offs=...)`` can run on these tensors: a supported
    dtype and device, and every non-unit stride and base address 16-byte aligned."""
    if x_NI.dtype not in _GROUPED_MM_DTYPES or w_LIO.dtype != x_NI.dtype:
        return False
    size = x_NI.element_size()
    for t in (x_NI, w_LIO):
        if t.data_ptr() % _ALIGNMENT_BYTES or any(s != 1 and (s * size) % _ALIGNMENT_BYTES for s in t.stride()):
            return False
    if (w_LIO.shape[-1] * size) % _ALIGNMENT_BYTES:  # the output's row stride
        return False
    return _grouped_mm_runs(x_NI.device.type, x_NI.device.index, x_NI.dtype)


def expert_linear(
    x_NI: torch.Tensor, w_LOI: torch.Tensor, counts: list[int], offsets: torch.Tensor, *, grouped: bool
) -> torch.Tensor:
    """Row block ``l`` of ``x_NI`` (``counts[l]`` rows) times ``w_LOI[l]^T`` -> ``[N, O]``.

    ``grouped``: one ``torch._grouped_mm`` with ``offsets`` (int32 cumulative counts) when the
    tensors allow it; otherwise (and when False) one ``torch.mm`` per local expert.
    """
    w_LIO = w_LOI.transpose(-2, -1)
    if grouped and grouped_mm_supported(x_NI, w_LIO):
        return torch._grouped_mm(x_NI, w_LIO, offs=offsets)
    blocks = x_NI.split(counts)
    return torch.cat([torch.mm(block, w_LIO[l]) for l, block in enumerate(blocks)])


class GroupedExperts(nn.Module):
    """The ``E / EP`` experts of this EP rank, tensor-parallel over ETP.

    forward(x_NH, counts, offsets) -> ``[N, H]``, this ETP rank's partial output (sum over ETP
    for the full one).
    """

    def __init__(
        self,
        config: ModelConfig,
        layout: ParallelState,
        *,
        num_experts: int,
        ep_size: int,
        dtype: torch.dtype = torch.float32,
        grouped_gemm: bool = True,
        fused_kernels: bool = True,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.groups = layout.experts(ep_size)
        etp = self.groups.etp_size
        ffn = config.moe_ffn_hidden_size  # divisible by ETP: ModelConfig.check_tensor_parallel
        num_local, hidden, local_ffn = num_experts // ep_size, config.hidden_size, ffn // etp
        self.swiglu = config.swiglu
        self.grouped_gemm = grouped_gemm
        self.fused_kernels = fused_kernels
        fc1_shape = (num_local, 2, local_ffn, hidden) if self.swiglu else (num_local, local_ffn, hidden)
        self.fc1 = tag_param(
            nn.Parameter(torch.empty(fc1_shape, dtype=dtype, device=device)),
            tensor_parallel_dim=len(fc1_shape) - 2,
            expert_parallel_size=ep_size,
            init_std=config.init_method_std,
        )
        self.fc2 = tag_param(
            nn.Parameter(torch.empty(num_local, hidden, local_ffn, dtype=dtype, device=device)),
            tensor_parallel_dim=2,
            expert_parallel_size=ep_size,
            init_std=config.output_layer_init_std,
        )
        self.fc1_bias = self.fc2_bias = None
        if config.add_bias_linear:
            self.fc1_bias = tag_param(
                nn.Parameter(torch.empty(fc1_shape[:-1], dtype=dtype, device=device)),
                tensor_parallel_dim=len(fc1_shape) - 2,
                expert_parallel_size=ep_size,
                weight_decay=False,
                init="zeros",
            )
            self.fc2_bias = tag_param(
                nn.Parameter(torch.empty(num_local, hidden, dtype=dtype, device=device)),
                expert_parallel_size=ep_size,
                weight_decay=False,
                init="zeros",
            )

    def forward(self, x_NH: torch.Tensor, counts: list[int], offsets: torch.Tensor) -> torch.Tensor:
        num_local, hidden = self.fc2.shape[0], self.fc2.shape[1]
        fc1_LOH = self.fc1.view(num_local, -1, hidden)  # SwiGLU: rows [gate F | up F], as the dense MLP
        h_NO = expert_linear(x_NH, fc1_LOH, counts, offsets, grouped=self.grouped_gemm)
        if self.fc1_bias is None:
            act_NF = activation(h_NO, self.swiglu, self.fused_kernels)
            return expert_linear(act_NF, self.fc2, counts, offsets, grouped=self.grouped_gemm)
        counts_L = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()
        row_expert_N = torch.repeat_interleave(
            torch.arange(num_local, device=x_NH.device), counts_L, output_size=x_NH.shape[0]
        )
        h_NO = h_NO + self.fc1_bias.view(num_local, -1)[row_expert_N]
        act_NF = activation(h_NO, self.swiglu, self.fused_kernels)
        y_NH = expert_linear(act_NF, self.fc2, counts, offsets, grouped=self.grouped_gemm)
        # The output is a partial sum over ETP, so the replicated fc2 bias is added on ETP rank 0
        # only (times 0 elsewhere, to keep every rank's backward the same); copy_to_group
        # all-reduces its gradient so that every ETP rank holds the full one.
        groups = self.groups
        only_first_rank = 1.0 if groups.etp_rank == 0 else 0.0
        return y_NH + only_first_rank * copy_to_group(self.fc2_bias, groups.etp_group, groups.etp_size)[row_expert_N]
