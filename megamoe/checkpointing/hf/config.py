"""megamoe ``ModelConfig`` <-> Hugging Face ``config.json``, for three model families.

* ``mixtral`` (``MixtralForCausalLM``): RMSNorm, RoPE (rotate-half, as megamoe's), multi-head
  or grouped-query attention, an MoE block in every layer with one expert count, SwiGLU experts
  without biases, softmax routing with the top-k probabilities renormalised (megamoe's default
  softmax after the top-k, which is the same function).
* ``qwen3_moe`` (``Qwen3MoeForCausalLM``): the same plus a per-head RMSNorm of queries and keys
  (``--qk-layernorm``), softmax over all experts before the top-k with or without
  renormalisation (``norm_topk_prob`` true: megamoe's default softmax after the top-k; false:
  ``--moe-router-pre-softmax``, Megatron's, which keeps the probabilities), experts of
  ``moe_intermediate_size``, and dense SwiGLU
  layers of ``intermediate_size`` where ``mlp_only_layers`` / ``decoder_sparse_step`` say so
  (``--moe-layer-freq``).

* ``deepseek_v3`` (``DeepseekV3ForCausalLM``): multi-latent attention, YaRN, dense first layers,
  shared experts, sigmoid routing with an expert bias, multi-token prediction; its mapping is
  ``megamoe.checkpointing.hf.deepseek_v3``.

A megamoe model is exported as ``deepseek_v3`` when it has ``--multi-latent-attention``, else as
``qwen3_moe`` when it has ``--qk-layernorm`` (Mixtral has no QK-norm), else as ``mixtral``.  Options of the model that the family has no equivalent for are
refused by ``check_exportable``, all at once, naming the flags.  Options that only act during
training (aux and z loss coefficients, router jitter, dropout, the grouped-GEMM switch) do not
change the function the model computes and are exported: those the family has are mapped, the
rest travel in ``config.json``'s ``"megamoe"`` entry so that an import restores the original
configuration exactly.

Import refuses, naming the field, what megamoe cannot express: multi-head latent attention,
sliding-window attention, RoPE scaling, attention biases, another activation, other model types.
"""

from __future__ import annotations

import torch

from megamoe.checkpointing.hf import deepseek_v3
from megamoe.checkpointing.hf.common import common_export_problems, megamoe_fields
from megamoe.model.config import ModelConfig

FAMILIES = ("mixtral", "qwen3_moe", deepseek_v3.FAMILY)
_NAMES = {"mixtral": "Mixtral", "qwen3_moe": "Qwen3-MoE", deepseek_v3.FAMILY: deepseek_v3.NAME}
_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}

# Fields a family's config cannot hold (or holds in another form); kept under "megamoe" in config.json.
MEGAMOE_ONLY = (
    "ffn_hidden_size",
    "kv_channels",
    "group_query_attention",
    "num_query_groups",
    "moe_layer_freq",
    "moe_z_loss_coeff",
    "moe_router_load_balancing_type",
    "make_vocab_size_divisible_by",
    "moe_input_jitter_eps",
    "hidden_dropout",
    "moe_token_drop_policy",
)

# Fields of other model families that name something megamoe has no equivalent for.
_UNSUPPORTED_FIELDS = {
    "kv_lora_rank": "multi-head latent attention",
    "q_lora_rank": "multi-head latent attention",
    "n_shared_experts": "shared experts",
    "shared_expert_intermediate_size": "a gated shared expert",
}


def export_family(config: ModelConfig) -> str:
    """The Hugging Face family ``config`` exports to: ``deepseek_v3`` with MLA, ``qwen3_moe`` with
    QK-norm, else ``mixtral``."""
    if config.multi_latent_attention:
        return deepseek_v3.FAMILY
    return "qwen3_moe" if config.qk_layernorm else "mixtral"


def export_problems(config: ModelConfig) -> list[str]:
    """Why ``config``'s model cannot be its ``export_family`` (empty when it can)."""
    family = export_family(config)
    if family == deepseek_v3.FAMILY:
        return deepseek_v3.export_problems(config)
    name = _NAMES[family]
    problems = common_export_problems(config, name)
    if config.position_embedding_type != "rope":
        problems.append(f"--position-embedding-type {config.position_embedding_type} ({name} uses RoPE)")
    if (config.rotary_seq_len_interpolation_factor or 1) != 1:
        problems.append(f"--rotary-seq-len-interpolation-factor {config.rotary_seq_len_interpolation_factor} "
                        f"({name}'s RoPE is not interpolated)")
    if config.moe_router_force_load_balancing:
        problems.append(f"--moe-router-force-load-balancing ({name} routes by its router)")
    if family == "mixtral" and config.num_experts and len(config.moe_layers) != config.num_layers:
        problems.append(
            f"--moe-layer-freq {config.moe_layer_freq}: MoE layers {list(config.moe_layers)} of "
            f"{config.num_layers} (Mixtral has an MoE block in every layer; Qwen3-MoE, chosen with "
            "--qk-layernorm, can have dense layers)"
        )
    if config.moe_shared_expert_intermediate_size:
        problems.append(f"--moe-shared-expert-intermediate-size ({name} has no shared expert)")
    if family == "mixtral" and config.moe_router_pre_softmax:
        problems.append(
            "--moe-router-pre-softmax (Mixtral renormalises the top-k probabilities, which is softmax after the "
            "top-k; Qwen3-MoE, chosen with --qk-layernorm, can keep them)"
        )
    if config.moe_router_score_function != "softmax":
        problems.append(f"--moe-router-score-function {config.moe_router_score_function} ({name}'s router is a softmax)")
    if config.moe_router_enable_expert_bias:
        problems.append(f"--moe-router-enable-expert-bias ({name}'s router has no expert bias)")
    if config.mtp_num_layers:
        problems.append(f"--mtp-num-layers {config.mtp_num_layers} ({name} has no multi-token prediction)")
    if config.rope_type != "rope":
        problems.append(f"--rope-type {config.rope_type} ({name} exports plain RoPE)")
    if config.moe_router_topk_scaling_factor is not None:
        problems.append(f"--moe-router-topk-scaling-factor ({name} does not scale the top-k weights)")
    if config.moe_router_num_groups is not None:
        problems.append(f"--moe-router-num-groups ({name} routes over all experts)")
    for flag, value in (
        ("--moe-expert-capacity-factor", config.moe_expert_capacity_factor),
        ("--moe-eval-capacity-factor", config.moe_eval_capacity_factor),
    ):
        if value is not None:
            problems.append(f"{flag} {value} ({name} routes every token: no capacity, no dropping)")
    return problems


def check_exportable(config: ModelConfig) -> None:
    """Raise ``ValueError`` listing every option of ``config`` without an equivalent in its family."""
    problems = export_problems(config)
    if problems:
        name = _NAMES[export_family(config)]
        raise ValueError(
            f"this model cannot be exported as Hugging Face {name}; these megamoe options have no equivalent there: "
            + "; ".join(problems)
        )


def to_hf_config(config: ModelConfig, *, dtype: torch.dtype, special_ids: dict[str, int] | None) -> dict:
    """``config.json`` of the Hugging Face model computing ``config``'s model (check_exportable first)."""
    family = export_family(config)
    if family == deepseek_v3.FAMILY:
        return {**deepseek_v3.to_hf_config(config, dtype=dtype), **(special_ids or {})}
    out = {
        "architectures": [_ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.init_method_std,
        "rms_norm_eps": config.norm_epsilon,
        "rope_theta": config.rotary_base,
        "rope_scaling": None,
        "sliding_window": None,
        "attention_dropout": config.attention_dropout,
        "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
        "num_experts_per_tok": config.moe_router_topk,
        "router_aux_loss_coef": config.moe_aux_loss_coeff,
        "output_router_logits": False,
        "use_cache": True,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "megamoe": {key: getattr(config, key) for key in MEGAMOE_ONLY},
    }
    if family == "mixtral":
        out.update(
            intermediate_size=config.moe_ffn_hidden_size,
            num_local_experts=config.num_experts[0],
            router_jitter_noise=config.moe_input_jitter_eps,
        )
    else:
        out.update(
            intermediate_size=config.ffn_hidden_size,
            moe_intermediate_size=config.moe_ffn_hidden_size,
            num_experts=config.num_experts[0],
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(config.num_layers) if not config.is_moe_layer(i)],
            norm_topk_prob=not config.moe_router_pre_softmax,
            attention_bias=False,
            use_sliding_window=False,
        )
    out.update(special_ids or {})
    return out


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if params:
        if params.get("rope_type", "default") != "default":
            raise ValueError(f"config.json: RoPE type {params.get('rope_type')!r} (megamoe has plain RoPE only)")
        return float(params["rope_theta"])
    if scaling:
        raise ValueError(f"config.json: rope_scaling {scaling} (megamoe has plain RoPE only)")
    return float(hf.get("rope_theta", 1e6))


def _qwen3_moe_layers(hf: dict) -> tuple[int, ...]:
    """Qwen3-MoE's rule: layer i is MoE unless listed in mlp_only_layers, and only when
    ``(i + 1) % decoder_sparse_step == 0``; as a 0/1 pattern."""
    dense = set(hf.get("mlp_only_layers") or ())
    step = hf.get("decoder_sparse_step", 1)
    return tuple(int(i not in dense and (i + 1) % step == 0) for i in range(hf["num_hidden_layers"]))


def _unsupported_fields(hf: dict) -> list[str]:
    problems = [f"{key} ({what})" for key, what in _UNSUPPORTED_FIELDS.items() if hf.get(key)]
    other_layers = sorted({t for t in hf.get("layer_types") or () if t != "full_attention"})
    if other_layers:
        problems.append(f"layer_types {other_layers} (megamoe has full causal attention only)")
    return problems


def _expressible(hf: dict, family: str) -> list[str]:
    """What ``hf`` holds that megamoe cannot express."""
    problems = _unsupported_fields(hf)
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if heads % kv_heads != 0:
        problems.append(f"num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (megamoe's MLPs are SwiGLU: silu)")
    window = hf.get("sliding_window")
    sliding = hf.get("use_sliding_window", family == "mixtral")
    if sliding and window is not None and window < hf["max_position_embeddings"]:
        problems.append(f"sliding_window {window} < max_position_embeddings {hf['max_position_embeddings']} "
                        "(sliding-window attention)")
    if hf.get("attention_bias"):
        problems.append("attention_bias (megamoe's attention biases come with biases on every linear layer)")
    if family == "qwen3_moe":
        if not any(_qwen3_moe_layers(hf)) or not hf.get("num_experts", hf.get("num_local_experts")):
            problems.append("no MoE layer (num_experts, mlp_only_layers, decoder_sparse_step)")
    return problems


def from_hf_config(hf: dict) -> ModelConfig:
    """The megamoe ``ModelConfig`` of a Mixtral, Qwen3-MoE or DeepSeek-V3 ``config.json`` (no
    MTP; set it later).  Raises ``ValueError`` naming the HF field megamoe cannot express."""
    family = hf.get("model_type")
    if family == deepseek_v3.FAMILY:
        problems = deepseek_v3.problems(hf)
        if problems:
            raise ValueError("config.json describes a model megamoe cannot express: " + "; ".join(problems))
        return deepseek_v3.from_hf_config(hf)
    if family not in FAMILIES:
        found = "; ".join(_unsupported_fields(hf) + (
            ["DeepSeek-V2's routing (softmax scores, greedy or group-limited-greedy top-k, no expert bias): megamoe "
             "imports deepseek_v3"] if family == "deepseek_v2" else []))
        raise ValueError(
            f"config.json: model_type {family!r}{f' ({found})' if found else ''}; megamoe imports {list(FAMILIES)}"
        )
    problems = _expressible(hf, family)
    if problems:
        raise ValueError("config.json describes a model megamoe cannot express: " + "; ".join(problems))
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hidden // heads
    fields = dict(
        vocab_size=hf["vocab_size"],
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        kv_channels=None if head_dim * heads == hidden else head_dim,
        group_query_attention=kv_heads != heads,
        num_query_groups=kv_heads if kv_heads != heads else None,
        max_position_embeddings=hf["max_position_embeddings"],
        normalization="RMSNorm",
        norm_epsilon=hf.get("rms_norm_eps", 1e-5),
        swiglu=True,
        position_embedding_type="rope",
        rotary_base=_rope_theta(hf),
        add_bias_linear=False,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        init_method_std=hf.get("initializer_range", 0.02),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        moe_router_topk=hf["num_experts_per_tok"],
        moe_aux_loss_coeff=hf.get("router_aux_loss_coef", 0.0),
    )
    if family == "mixtral":
        fields.update(
            ffn_hidden_size=hf["intermediate_size"],
            moe_ffn_hidden_size=hf["intermediate_size"],
            num_experts=(hf["num_local_experts"],),
            moe_layer_freq=1,
            moe_input_jitter_eps=hf.get("router_jitter_noise", 0.0),
        )
    else:
        pattern = _qwen3_moe_layers(hf)
        fields.update(
            qk_layernorm=True,
            ffn_hidden_size=hf["intermediate_size"],
            moe_ffn_hidden_size=hf["moe_intermediate_size"],
            num_experts=(hf.get("num_experts") or hf["num_local_experts"],),
            moe_layer_freq=1 if all(pattern) else pattern,
            moe_router_pre_softmax=not hf.get("norm_topk_prob", False),
        )
    fields.update(megamoe_fields(hf))
    return ModelConfig(**fields)
