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

DeepSeek-V3 (``deepseek_v3``; MoE names as Qwen3-MoE's, attention as ``megamoe.model.mla``)::

    layers.i.attention.q_down / q_norm / q_up   model.layers.i.self_attn.q_a_proj / q_a_layernorm / q_b_proj
    layers.i.attention.q_proj (no q-lora)       model.layers.i.self_attn.q_proj
    layers.i.attention.kv_down / kv_norm / kv_up  ...self_attn.kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj
    layers.i.mlp.router.expert_bias (buffer)    model.layers.i.mlp.gate.e_score_correction_bias
    layers.i.mlp.shared_expert.fc1 [2, F, h]    model.layers.i.mlp.shared_experts.gate_proj / up_proj
    layers.i.mlp.shared_expert.fc2              model.layers.i.mlp.shared_experts.down_proj
    mtp.k.{enorm, hnorm, eh_proj}               model.layers.{L+k}.{enorm, hnorm, eh_proj}
    mtp.k.final_norm                            model.layers.{L+k}.shared_head.norm
    mtp.k.block.X                               model.layers.{L+k}.X (as layer L+k's X)
    word_embeddings, output_layer               also model.layers.{L+k}.embed_tokens / shared_head.head
                                                (DeepSeek's copies per MTP depth; megamoe shares them)

DeepSeek's checkpoints store the RoPE rows of the query and of the shared key interleaved
(``rope_interleave``: pairs ``(x0, x1), (x2, x3), ...``); megamoe rotates halves, so those rows
are reordered (evens, then odds) on import and back on export.  Attention scores are dot products
over the same permutation of both, so the model computes the same function.
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
_MOE_NAMES["deepseek_v3"] = _MOE_NAMES["qwen3_moe"]
_MLA = {
    "attention.q_down.weight": "self_attn.q_a_proj.weight",
    "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attention.q_up.weight": "self_attn.q_b_proj.weight",
    "attention.q_proj.weight": "self_attn.q_proj.weight",
    "attention.kv_down.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attention.kv_up.weight": "self_attn.kv_b_proj.weight",
    "mlp.router.expert_bias": "mlp.gate.e_score_correction_bias",
    "mlp.shared_expert.fc2.weight": "mlp.shared_experts.down_proj.weight",
}
_MTP = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
        "final_norm.weight": "shared_head.norm.weight"}
_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")
_MTP_NAME = re.compile(r"^mtp\.(\d+)\.(.+)$")


def _mtp_copies(config: ModelConfig, leaf: str) -> list[str]:
    return [f"model.layers.{layer}.{leaf}" for layer in config.mtp_layers]


def hf_names(name: str, config: ModelConfig) -> list[str]:
    """The HF tensors that hold megamoe parameter (or persistent buffer) ``name`` (``split``
    yields them in this order)."""
    if name == "word_embeddings.weight":
        tied = [] if config.untie_embeddings_and_output_weights else _mtp_copies(config, "shared_head.head.weight")
        return [_SIMPLE[name], *_mtp_copies(config, "embed_tokens.weight"), *tied]
    if name == "output_layer.weight":
        return [_SIMPLE[name], *_mtp_copies(config, "shared_head.head.weight")]
    if name in _SIMPLE:
        return [_SIMPLE[name]]
    mtp = _MTP_NAME.match(name)
    if mtp is not None:
        depth, rest = mtp.groups()
        layer = config.mtp_layers[int(depth)]
        if rest in _MTP:
            return [f"model.layers.{layer}.{_MTP[rest]}"]
        if rest.startswith("block."):
            return hf_names(f"layers.{layer}.{rest[len('block.'):]}", config)
        raise ValueError(f"parameter {name} has no Hugging Face equivalent")
    match = _LAYER_NAME.match(name)
    if match is None:
        raise ValueError(f"parameter {name} has no Hugging Face equivalent")
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}."
    if config.multi_latent_attention and rest in _MLA:
        return [prefix + _MLA[rest]]
    if rest == "mlp.shared_expert.fc1.weight":
        return [prefix + "mlp.shared_experts.gate_proj.weight", prefix + "mlp.shared_experts.up_proj.weight"]
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


def _rope_rows(full: torch.Tensor, config: ModelConfig, name: str) -> tuple[torch.Tensor, int, int] | None:
    """MLA weights with RoPE rows: the weight viewed ``[groups, rows, in]`` and the RoPE rows'
    range ``[first, first + dr)`` in each group (per head for queries, once for the shared key)."""
    dr = config.qk_pos_emb_head_dim
    if name.endswith(("attention.q_up.weight", "attention.q_proj.weight")):
        width = config.mla_query_head_dim
        return full.view(config.num_attention_heads, width, full.shape[-1]), width - dr, dr
    if name.endswith("attention.kv_down.weight"):
        return full.view(1, *full.shape), config.kv_lora_rank, dr
    return None


def _reorder_rope(full: torch.Tensor, config: ModelConfig, name: str, *, to_halves: bool) -> torch.Tensor:
    """Interleaved RoPE rows -> halves (``to_halves``), or back; other tensors unchanged."""
    rows = _rope_rows(full, config, name)
    if rows is None:
        return full
    grouped, first, dr = rows
    order = torch.cat([torch.arange(0, dr, 2), torch.arange(1, dr, 2)])
    if not to_halves:
        order = torch.argsort(order)
    out = grouped.clone()
    out[:, first : first + dr] = grouped[:, first + order]
    return out.view(full.shape)


def split(name: str, full: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    """megamoe full tensor -> its HF tensors (contiguous copies; DeepSeek-V3's RoPE rows interleaved)."""
    names = hf_names(name, config)
    if name.endswith("attention.qkv.weight"):
        parts = _qkv_split(full, config)
    elif name.endswith("mlp.experts.fc1"):
        parts = [full[j, w] for j in range(full.shape[0]) for w in (0, 1)]  # [E, (gate, up), F, h]
    elif name.endswith(("mlp.experts.fc2", "mlp.fc1.weight", "mlp.shared_expert.fc1.weight")):
        parts = list(full.unbind(0))
    elif len(names) > 1:  # the embedding or output layer and DeepSeek's copies of it per MTP depth
        parts = [full, *(full.clone() for _ in names[1:])]
    else:
        parts = [_reorder_rope(full, config, name, to_halves=False) if config.multi_latent_attention else full]
    assert len(parts) == len(names), (name, len(parts), len(names))
    return {n: p.contiguous() for n, p in zip(names, parts)}


def join(name: str, tensors: list[torch.Tensor], config: ModelConfig, *, rope_interleaved: bool = True) -> torch.Tensor:
    """The HF tensors of ``hf_names(name)``, in that order -> megamoe's full tensor.
    ``rope_interleaved``: DeepSeek-V3's ``rope_interleave`` (its RoPE rows are reordered to halves).
    Raises ``ValueError`` when DeepSeek's per-MTP-depth copies of the embedding or output layer
    differ from the model's (megamoe's MTP shares them)."""
    if name.endswith("attention.qkv.weight"):
        return _qkv_join(*tensors, config)
    if name.endswith(("mlp.experts.fc2", "mlp.fc1.weight", "mlp.shared_expert.fc1.weight")):
        return torch.stack(tensors)
    if name.endswith("mlp.experts.fc1"):
        pairs = [torch.stack(tensors[i : i + 2]) for i in range(0, len(tensors), 2)]  # (gate, up)
        return torch.stack(pairs)
    if len(tensors) > 1:
        names = hf_names(name, config)
        for other, tensor in zip(names[1:], tensors[1:]):
            if not torch.equal(tensor, tensors[0]):
                raise ValueError(f"{other} differs from {names[0]}: megamoe's MTP shares the model's embedding and "
                                 "output layer")
        return tensors[0]
    (tensor,) = tensors
    if config.multi_latent_attention and rope_interleaved:
        return _reorder_rope(tensor, config, name, to_halves=True)
    return tensor
