"""megamoe parameter names <-> Hugging Face tensor names, for Mixtral and Qwen3-MoE.

``i`` a layer, ``j`` an expert; megamoe tensors are full (see ``megamoe.checkpointing.param_specs``); ``n`` query heads,
``G`` key/value heads, ``r = n / G``, ``d`` the head dim::

    word_embeddings.weight [V, h]               model.embed_tokens.weight
    layers.i.input_norm.weight                  model.layers.i.input_layernorm.weight
    layers.i.attention.qkv.weight [r+2, G*d, h] model.layers.i.self_attn.{q,k,v}_proj.weight
    layers.i.attention.q_norm.weight [d]        model.layers.i.self_attn.q_norm.weight (Qwen3-MoE)
    layers.i.attention.k_norm.weight [d]        model.layers.i.self_attn.k_norm.weight (Qwen3-MoE)
    layers.i.attention.proj.weight              model.layers.i.self_attn.o_proj.weight
    layers.i.post_attention_norm.weight         model.layers.i.post_attention_layernorm.weight
    final_norm.weight                           model.norm.weight
    output_layer.weight [V, h]                  lm_head.weight (absent with tied embeddings)

MoE layers (Mixtral: ``block_sparse_moe`` with experts ``w1`` gate, ``w3`` up, ``w2`` down;
Qwen3-MoE: ``mlp`` with ``gate_proj``, ``up_proj``, ``down_proj``)::

    layers.i.mlp.router.weight [E, h]           ...block_sparse_moe.gate.weight | ...mlp.gate.weight
    layers.i.mlp.experts.fc1 [E, 2, F, h]       ...experts.j.w1 / w3 .weight    | ...experts.j.gate_proj / up_proj .weight
    layers.i.mlp.experts.fc2 [E, h, F]          ...experts.j.w2.weight          | ...experts.j.down_proj.weight

Dense layers (Qwen3-MoE's ``mlp_only_layers``)::

    layers.i.mlp.fc1.weight [2, F, h]           model.layers.i.mlp.gate_proj / up_proj .weight
    layers.i.mlp.fc2.weight [h, F]              model.layers.i.mlp.down_proj.weight

The fused QKV rows are grouped by KV head (``attention``): HF's query head ``g*r + i`` is row
``i`` of group ``g``.  This is the Hub's layout (transformers >= 5 fuses the experts on load).
"""

from __future__ import annotations

import re

import torch

from megamoe.checkpointing.hf.config import export_family
from megamoe.model.config import ModelConfig

_SIMPLE = {
    "word_embeddings.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_LAYER_SIMPLE = {
    "input_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "attention.proj.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "mlp.fc2.weight": "mlp.down_proj.weight",
}
# family -> (MoE block, router, expert (gate, up, down))
_MOE_NAMES = {
    "mixtral": ("block_sparse_moe", "gate", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
}
_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")


def hf_names(name: str, config: ModelConfig) -> list[str]:
    """The HF tensors that hold megamoe parameter ``name`` (``split`` yields them in this order)."""
    if name in _SIMPLE:
        return [_SIMPLE[name]]
    match = _LAYER_NAME.match(name)
    if match is None:
        raise ValueError(f"parameter {name} has no Hugging Face equivalent")
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}."
    if rest in _LAYER_SIMPLE:
        return [prefix + _LAYER_SIMPLE[rest]]
    if rest == "attention.qkv.weight":
        return [prefix + f"self_attn.{p}_proj.weight" for p in "qkv"]
    if rest == "mlp.fc1.weight":
        return [prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight"]
    block, router, (gate, up, down) = _MOE_NAMES[export_family(config)]
    if rest == "mlp.router.weight":
        return [prefix + f"{block}.{router}.weight"]
    experts = range(config.num_experts_for_layer(int(layer)))
    if rest == "mlp.experts.fc1":
        return [prefix + f"{block}.experts.{j}.{w}.weight" for j in experts for w in (gate, up)]
    if rest == "mlp.experts.fc2":
        return [prefix + f"{block}.experts.{j}.{down}.weight" for j in experts]
    raise ValueError(f"parameter {name} has no Hugging Face equivalent")


def _qkv_split(full: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    """``[r+2, G*d, h]`` -> q ``[n*d, h]`` (head-major), k and v ``[G*d, h]``."""
    r = config.num_attention_heads // config.num_kv_heads
    groups, d, h = config.num_kv_heads, config.head_dim, full.shape[-1]
    q = full[:r].reshape(r, groups, d, h).transpose(0, 1).reshape(r * groups * d, h)
    return [q, full[r], full[r + 1]]


def _qkv_join(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    r = config.num_attention_heads // config.num_kv_heads
    groups, d, h = config.num_kv_heads, config.head_dim, q.shape[-1]
    rows = q.reshape(groups, r, d, h).transpose(0, 1).reshape(r, groups * d, h)
    return torch.cat([rows, k.unsqueeze(0), v.unsqueeze(0)])


def split(name: str, full: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    """megamoe full tensor -> its HF tensors (contiguous copies)."""
    names = hf_names(name, config)
    if name.endswith("attention.qkv.weight"):
        parts = _qkv_split(full, config)
    elif name.endswith("mlp.experts.fc1"):
        parts = [full[j, w] for j in range(full.shape[0]) for w in (0, 1)]  # [E, (gate, up), F, h]
    elif name.endswith("mlp.experts.fc2") or name.endswith("mlp.fc1.weight"):
        parts = list(full.unbind(0))
    else:
        parts = [full]
    assert len(parts) == len(names), (name, len(parts), len(names))
    return {n: p.contiguous() for n, p in zip(names, parts)}


def join(name: str, tensors: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """The HF tensors of ``hf_names(name)``, in that order -> megamoe's full tensor."""
    if name.endswith("attention.qkv.weight"):
        return _qkv_join(*tensors, config)
    if name.endswith("mlp.experts.fc2") or name.endswith("mlp.fc1.weight"):
        return torch.stack(tensors)
    if name.endswith("mlp.experts.fc1"):
        pairs = [torch.stack(tensors[i : i + 2]) for i in range(0, len(tensors), 2)]  # (gate, up)
        return torch.stack(pairs)
    (tensor,) = tensors
    return tensor
