"""RMSNorm / LayerNorm.  apex's fused kernels are used on CUDA when apex is importable;
otherwise PyTorch's own ``F.rms_norm`` / ``F.layer_norm`` (the fallback CI tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.model.config import ModelConfig
from megamoe.parallel.params import replicated_bias, tag_param

try:  # NVIDIA apex is optional and never installed from PyPI.
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine

    HAVE_APEX = True
except ImportError:
    HAVE_APEX = False


class Norm(nn.Module):
    """Normalisation over the last dim of ``[..., size]`` (default size: the hidden size);
    weight (and LayerNorm bias) replicated over TP."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        size: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        use_apex: bool = HAVE_APEX,
    ) -> None:
        super().__init__()
        self.kind = config.normalization
        self.eps = config.norm_epsilon
        self.use_apex = use_apex
        hidden = config.hidden_size if size is None else size
        self.weight = tag_param(
            nn.Parameter(torch.empty(hidden, dtype=dtype, device=device)), weight_decay=False, init="ones"
        )
        self.bias = None
        if self.kind == "LayerNorm":
            self.bias = replicated_bias(hidden, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x, self.weight, self.bias)

    def normalize(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The norm of ``x`` with the affine ``weight`` (and LayerNorm ``bias``) given."""
        shape = (x.shape[-1],)
        if self.use_apex and x.is_cuda:
            if self.kind == "RMSNorm":
                return fused_rms_norm_affine(x, weight, shape, self.eps)
            return fused_layer_norm_affine(x, weight, bias, shape, self.eps)
        if self.kind == "RMSNorm":
            return F.rms_norm(x, shape, weight, self.eps)
        return F.layer_norm(x, shape, weight, bias, self.eps)
