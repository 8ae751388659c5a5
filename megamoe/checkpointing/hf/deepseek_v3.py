"""megamoe ``ModelConfig`` <-> Hugging Face ``deepseek_v3`` ``config.json`` (``DeepseekV3ForCausalLM``:
DeepSeek-V3/R1, Kimi K2, Moonlight).

What maps to what (megamoe flag <- field):

* multi-latent attention with its latent norms (``--multi-latent-attention --qk-layernorm``):
  ``q_lora_rank`` (null: a plain query projection), ``kv_lora_rank``, ``qk_nope_head_dim``
  (``--qk-head-dim``), ``qk_rope_head_dim`` (``--qk-pos-emb-head-dim``), ``v_head_dim``;
* RoPE ``rope_theta`` and YaRN ``rope_scaling`` / ``rope_parameters`` (``factor``,
  ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``, ``mscale``,
  ``mscale_all_dim``; transformers' temperature when one of the two mscales is 0 is Megatron's
  with ``--mscale 1 --mscale-all-dim 0``);
* ``first_k_dense_replace`` dense layers of ``intermediate_size``, then MoE layers of
  ``n_routed_experts`` experts of ``moe_intermediate_size`` (a ``--moe-layer-freq`` pattern),
  ``n_shared_experts`` x ``moe_intermediate_size`` (``--moe-shared-expert-intermediate-size``);
* the router: sigmoid scores with the expert bias (``e_score_correction_bias``), top
  ``num_experts_per_tok``, ``norm_topk_prob`` (else ``--no-moe-router-renormalize``),
  ``routed_scaling_factor`` (``--moe-router-topk-scaling-factor``), ``n_group`` / ``topk_group``
  (``--moe-router-num-groups`` / ``--moe-router-group-topk``; DeepSeek scores a group by its best
  two experts, megamoe by its best ``topk / group-topk``, so these must make two);
* ``num_nextn_predict_layers`` (``--mtp-num-layers``) when the checkpoint holds the MTP weights
  (``HFReader`` decides: transformers writes the field without the weights);
* ``aux_loss_alpha`` and ``seq_aux`` (DeepSeek's own fields) -> ``--moe-aux-loss-coeff`` with
  ``--moe-router-load-balancing-type seq_aux_loss``.

Refused, naming the field: DeepSeek-V2's other routing (``topk_method`` other than ``noaux_tc``,
``scoring_func`` other than ``sigmoid``), quantized weights (``quantization_config``: DeepSeek's
fp8 release needs dequantizing first), another activation, attention biases, no shared expert.
"""

from __future__ import annotations

import torch

from megamoe.checkpointing.hf.common import common_export_problems, megamoe_fields
from megamoe.model.config import ModelConfig
from megamoe.model.rope import yarn_mscale

FAMILY = "deepseek_v3"
NAME = "DeepSeek-V3"

# Fields deepseek_v3's config cannot hold; kept under "megamoe" in config.json.
MEGAMOE_ONLY = (
    "moe_z_loss_coeff",
    "moe_input_jitter_eps",
    "hidden_dropout",
    "moe_router_bias_update_rate",
    "moe_router_load_balancing_type",
    "moe_aux_loss_coeff",
    "mtp_loss_scaling_factor",
)


def _dense_prefix(config: ModelConfig) -> int | None:
    """``first_k_dense_replace``: the number of leading dense layers, or None when the MoE layers
    are not all the layers after them."""
    first = config.moe_layers[0] if config.moe_layers else config.num_layers
    return first if config.moe_layers == tuple(range(first, config.num_layers)) else None


def export_problems(config: ModelConfig) -> list[str]:
    """Why ``config``'s model cannot be a Hugging Face DeepSeek-V3 (empty when it can)."""
    problems = common_export_problems(config, NAME)
    if not config.qk_layernorm:
        problems.append(f"no --qk-layernorm ({NAME} normalises its query and key/value latents)")
    if not config.num_experts:
        return problems
    if _dense_prefix(config) is None:
        problems.append(f"--moe-layer-freq {config.moe_layer_freq}: MoE layers {list(config.moe_layers)} ({NAME}'s "
                        "dense layers come first, then only MoE layers)")
    if config.moe_router_score_function != "sigmoid" or not config.moe_router_enable_expert_bias:
        problems.append(f"a router without --moe-router-score-function sigmoid --moe-router-enable-expert-bias "
                        f"({NAME}'s router is sigmoid scores with an expert bias)")
    groups, group_topk = config.moe_router_num_groups, config.moe_router_group_topk
    if groups is not None and config.moe_router_topk != 2 * group_topk:
        problems.append(f"--moe-router-topk {config.moe_router_topk} with --moe-router-group-topk {group_topk} "
                        f"({NAME} scores each group by its best 2 experts: topk = 2 x group-topk)")
    if groups is None and min(config.num_experts) < 2:
        problems.append(f"one expert ({NAME} scores a group by its best 2 experts)")
    shared = config.moe_shared_expert_intermediate_size
    if not shared or shared % config.moe_ffn_hidden_size:
        problems.append(f"--moe-shared-expert-intermediate-size {shared} ({NAME} has n_shared_experts of "
                        f"--moe-ffn-hidden-size {config.moe_ffn_hidden_size} each)")
    for flag, value in (("--moe-expert-capacity-factor", config.moe_expert_capacity_factor),
                        ("--moe-eval-capacity-factor", config.moe_eval_capacity_factor)):
        if value is not None:
            problems.append(f"{flag} {value} ({NAME} routes every token: no capacity, no dropping)")
    return problems


def _rope_scaling(config: ModelConfig) -> dict | None:
    if config.rope_type != "yarn":
        return None
    factor = config.rotary_scaling_factor
    scaling = {
        "rope_type": "yarn", "factor": factor, "original_max_position_embeddings": config.original_max_position_embeddings,
        "beta_fast": config.beta_fast, "beta_slow": config.beta_slow, "mscale": config.mscale,
        "mscale_all_dim": config.mscale_all_dim,
    }
    if not (config.mscale and config.mscale_all_dim):  # transformers would take its own temperature
        scaling["attention_factor"] = yarn_mscale(factor, config.mscale) / yarn_mscale(factor, config.mscale_all_dim)
    return scaling


def to_hf_config(config: ModelConfig, *, dtype: torch.dtype) -> dict:
    """``config.json`` fields of the DeepSeek-V3 model computing ``config``'s model (check first)."""
    experts, moe_ffn = config.num_experts[0], config.moe_ffn_hidden_size
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": FAMILY,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "moe_intermediate_size": moe_ffn,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,
        "n_shared_experts": config.moe_shared_expert_intermediate_size // moe_ffn,
        "n_routed_experts": experts,
        "routed_scaling_factor": config.moe_router_topk_scaling_factor or 1.0,
        "kv_lora_rank": config.kv_lora_rank,
        "q_lora_rank": config.q_lora_rank,
        "qk_nope_head_dim": config.qk_head_dim,
        "qk_rope_head_dim": config.qk_pos_emb_head_dim,
        "v_head_dim": config.v_head_dim,
        "n_group": config.moe_router_num_groups or 1,
        "topk_group": config.moe_router_group_topk or 1,
        "num_experts_per_tok": config.moe_router_topk,
        "first_k_dense_replace": _dense_prefix(config),
        "norm_topk_prob": config.moe_router_renormalize,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.init_method_std,
        "rms_norm_eps": config.norm_epsilon,
        "rope_theta": config.rotary_base,
        "rope_scaling": _rope_scaling(config),
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": config.attention_dropout,
        "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
        "num_nextn_predict_layers": config.mtp_num_layers or 0,
        "aux_loss_alpha": config.moe_aux_loss_coeff,
        "seq_aux": config.moe_router_load_balancing_type == "seq_aux_loss",
        "use_cache": True,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "megamoe": {key: getattr(config, key) for key in MEGAMOE_ONLY},
    }


def _rope_fields(hf: dict) -> tuple[dict, list[str]]:
    """megamoe's RoPE fields of ``hf``, and what megamoe cannot express of it."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return dict(rotary_base=theta, rope_type="rope"), []
    if kind != "yarn":
        return {}, [f"RoPE type {kind!r} (megamoe has plain RoPE and YaRN)"]
    factor = float(params.get("factor") or hf["max_position_embeddings"] / params["original_max_position_embeddings"])
    both = bool(params.get("mscale") and params.get("mscale_all_dim"))
    fields = dict(
        rotary_base=theta, rope_type="yarn", rotary_scaling_factor=factor,
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params["mscale"]) if both else 1.0,
        mscale_all_dim=float(params["mscale_all_dim"]) if both else 0.0,
    )
    given = params.get("attention_factor")
    if not both and params.get("mscale_all_dim"):  # transformers: the softmax scale alone
        return {}, [f"rope mscale_all_dim {params['mscale_all_dim']} without mscale (transformers then scales cos/sin "
                    "by its default temperature, which no --mscale/--mscale-all-dim pair gives)"]
    if given is not None:
        own = yarn_mscale(factor, fields["mscale"]) / yarn_mscale(factor, fields["mscale_all_dim"])
        if not both and params.get("mscale"):  # the temperature megamoe's export writes for --mscale-all-dim 0
            fields["mscale"] = float(params["mscale"])
            own = yarn_mscale(factor, fields["mscale"])
        if abs(given - own) > 1e-9 * own:
            return {}, [f"rope attention_factor {given} (megamoe's is mscale(factor, mscale) / "
                        "mscale(factor, mscale_all_dim))"]
    return fields, []


def problems(hf: dict) -> list[str]:
    """What ``hf`` (a deepseek_v3 config.json) holds that megamoe cannot express."""
    out = []
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        out.append(f"quantization_config ({method} weights: dequantize them to bf16 first)")
    if hf.get("hidden_act", "silu") != "silu":
        out.append(f"hidden_act {hf['hidden_act']!r} (megamoe's MLPs are SwiGLU: silu)")
    if hf.get("attention_bias"):
        out.append("attention_bias (megamoe's MLA biases come with biases on every linear layer)")
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        out.append(f"scoring_func {hf['scoring_func']!r} (DeepSeek-V2's routing; megamoe imports V3's sigmoid scores)")
    if hf.get("topk_method", "noaux_tc") != "noaux_tc":
        out.append(f"topk_method {hf['topk_method']!r} (DeepSeek-V2's routing; megamoe imports V3's noaux_tc)")
    if (hf.get("moe_layer_freq") or 1) != 1:
        out.append(f"moe_layer_freq {hf['moe_layer_freq']} (megamoe imports an MoE block in every layer after "
                   "first_k_dense_replace)")
    if not hf.get("n_shared_experts"):
        out.append("n_shared_experts 0 (megamoe imports DeepSeek-V3 with its shared experts)")
    groups, k = hf.get("n_group") or 1, hf["num_experts_per_tok"]
    if groups > 1 and k != 2 * (hf.get("topk_group") or 1):
        out.append(f"num_experts_per_tok {k} with topk_group {hf.get('topk_group')} (DeepSeek scores a group by its "
                   "best 2 experts, megamoe by its best num_experts_per_tok / topk_group)")
    return out + _rope_fields(hf)[1]


def from_hf_config(hf: dict) -> ModelConfig:
    """The megamoe ``ModelConfig`` of a deepseek_v3 ``config.json`` without MTP (``HFReader`` sets
    ``mtp_num_layers`` from the weights).  Check ``problems`` first."""
    layers, dense = hf["num_hidden_layers"], hf.get("first_k_dense_replace") or 0
    moe_ffn, groups = hf["moe_intermediate_size"], hf.get("n_group") or 1
    scaling = hf.get("routed_scaling_factor", 1.0)
    fields = dict(
        vocab_size=hf["vocab_size"],
        num_layers=layers,
        hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"],
        ffn_hidden_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        normalization="RMSNorm",
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        swiglu=True,
        position_embedding_type="rope",
        add_bias_linear=False,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        init_method_std=hf.get("initializer_range", 0.02),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        multi_latent_attention=True,
        qk_layernorm=True,
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_head_dim=hf["qk_nope_head_dim"],
        qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        num_experts=(hf["n_routed_experts"],),
        moe_ffn_hidden_size=moe_ffn,
        moe_layer_freq=1 if dense == 0 else tuple(int(i >= dense) for i in range(layers)),
        moe_shared_expert_intermediate_size=hf["n_shared_experts"] * moe_ffn,
        moe_router_topk=hf["num_experts_per_tok"],
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_renormalize=bool(hf.get("norm_topk_prob", True)),
        moe_router_topk_scaling_factor=None if scaling == 1.0 else float(scaling),
        moe_router_num_groups=groups if groups > 1 else None,
        moe_router_group_topk=hf.get("topk_group") if groups > 1 else None,
        moe_aux_loss_coeff=float(hf.get("aux_loss_alpha", 0.0)),
        moe_router_load_balancing_type="seq_aux_loss" if hf.get("seq_aux") else "aux_loss",
        **_rope_fields(hf)[0],
    )
    fields.update(megamoe_fields(hf))
    return ModelConfig(**fields)
