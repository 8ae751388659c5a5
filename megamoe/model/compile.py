"""Regional torch.compile (``--compile``): the parts of the model with static shapes.

Compiled in place with ``nn.Module.compile`` (parameter names and checkpoints do not change):
every attention block (QKV, RoPE, SDPA, output projection: the RoPE elementwise work fuses),
every norm, the dense MLPs, and the experts' activation (SwiGLU's silu x up fuses into one
kernel; compiled with dynamic shapes because the number of routed rows changes every step).
The MoE dispatch (data-dependent split sizes) and the grouped GEMMs stay eager.
"""

from __future__ import annotations

import torch

from megamoe.model.mlp import activation


def compile_regions(model) -> list[str]:
    """Compile ``model``'s static regions in place; returns what was compiled (for the log)."""
    compiled = []
    for i, layer in enumerate(model.layers):
        for name in ("input_norm", "attention", "post_attention_norm"):
            getattr(layer, name).compile()
            compiled.append(f"layers.{i}.{name}")
        if layer.is_moe:
            layer.mlp.experts.activation_fn = torch.compile(activation, dynamic=True)
            compiled.append(f"layers.{i}.mlp.experts.activation")
        else:
            layer.mlp.compile()
            compiled.append(f"layers.{i}.mlp")
    model.final_norm.compile()
    compiled.append("final_norm")
    return compiled
