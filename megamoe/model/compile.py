"""Regional torch.compile (``--compile``): the parts of the model with static shapes.

Compiled in place with ``nn.Module.compile`` (parameter names and checkpoints do not change):
every attention block (QKV, RoPE, SDPA, output projection: the RoPE elementwise work fuses),
every norm and the dense MLPs.  The MoE layer stays eager: its dispatch has data-dependent split
sizes, and its expert activation, compiled with dynamic shapes (the routed row count changes
every step), ran slower than eager on an H200 (SwiGLU backward 2.5 ms against ~1.6 ms eager
per moe-1b-4e layer).
"""

from __future__ import annotations


def compile_regions(model) -> list[str]:
    """Compile ``model``'s static regions in place; returns what was compiled (for the log)."""
    compiled = []
    for i, layer in model.layers.items():
        for name in ("input_norm", "attention", "post_attention_norm"):
            getattr(layer, name).compile()
            compiled.append(f"layers.{i}.{name}")
        if not layer.is_moe:
            layer.mlp.compile()
            compiled.append(f"layers.{i}.mlp")
    if model.final_norm is not None:  # the last pipeline stage's
        model.final_norm.compile()
        compiled.append("final_norm")
    return compiled
