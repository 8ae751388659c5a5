"""megamoe ``ModelConfig`` <-> Hugging Face ``MixtralConfig`` (``config.json``).

Mixtral is: RMSNorm, RoPE (rotate-half, as megamoe's), SwiGLU experts without biases, an MoE
block in every layer with one expert count, a softmax router whose top-k probabilities are
renormalised, no token dropping, no shared expert.  megamoe options outside that have no HF
equivalent and ``check_exportable`` refuses them, all at once, naming the flags.  Options that
only act during training (aux and z loss coefficients, router jitter, dropout, the grouped-GEMM
switch) do not change the function the model computes and are exported: those Mixtral has are
mapped, the rest travel in ``config.json``'s ``"megamoe"`` entry so that an import restores the
original configuration exactly.

Import refuses what megamoe cannot express: grouped-query attention (fewer KV heads), a sliding
window shorter than the context, RoPE scaling, another activation or head size.
"""

from __future__ import annotations

import torch

from megamoe.model.config import ModelConfig

# Fields Mixtral's config cannot hold; kept under "megamoe" in config.json.
MEGAMOE_ONLY = (
    "ffn_hidden_size",
    "moe_z_loss_coeff",
    "moe_router_pre_softmax",
    "moe_router_renormalize",
    "moe_grouped_gemm",
    "hidden_dropout",
    "moe_token_drop_policy",
)


def export_problems(config: ModelConfig) -> list[str]:
    """Why ``config``'s model cannot be a ``MixtralForCausalLM`` (empty when it can)."""
    problems = []
    if config.normalization != "RMSNorm":
        problems.append(f"--normalization {config.normalization} (Mixtral uses RMSNorm)")
    if config.position_embedding_type != "rope":
        problems.append(f"--position-embedding-type {config.position_embedding_type} (Mixtral uses RoPE)")
    if not config.swiglu:
        problems.append("GeLU MLPs, no --swiglu (Mixtral's experts are SwiGLU)")
    if config.add_bias_linear:
        problems.append("linear biases, no --disable-bias-linear (Mixtral has none)")
    if not config.num_experts:
        problems.append("a dense model, no --num-experts (Mixtral has an MoE block in every layer)")
    else:
        if len(config.moe_layers) != config.num_layers:
            problems.append(
                f"--moe-layer-freq {config.moe_layer_freq}: MoE layers {list(config.moe_layers)} of "
                f"{config.num_layers} (Mixtral has an MoE block in every layer)"
            )
        if len(set(config.num_experts)) > 1:
            problems.append(f"--num-experts {list(config.num_experts)} per layer (Mixtral has one expert count)")
    if config.moe_shared_expert_intermediate_size:
        problems.append("--moe-shared-expert-intermediate-size (Mixtral has no shared expert)")
    if config.moe_router_pre_softmax and not config.moe_router_renormalize:
        problems.append(
            "--moe-router-pre-softmax with --no-moe-router-renormalize (Mixtral renormalises the top-k probabilities)"
        )
    if config.moe_router_score_function != "softmax":
        problems.append(f"--moe-router-score-function {config.moe_router_score_function} (Mixtral's router is a softmax)")
    if config.moe_router_enable_expert_bias:
        problems.append("--moe-router-enable-expert-bias (Mixtral's router has no expert bias)")
    if config.moe_router_topk_scaling_factor is not None:
        problems.append("--moe-router-topk-scaling-factor (Mixtral does not scale the top-k weights)")
    if config.moe_router_num_groups is not None:
        problems.append("--moe-router-num-groups (Mixtral routes over all experts)")
    for flag, value in (
        ("--moe-expert-capacity-factor", config.moe_expert_capacity_factor),
        ("--moe-eval-capacity-factor", config.moe_eval_capacity_factor),
    ):
        if value is not None:
            problems.append(f"{flag} {value} (Mixtral routes every token: no capacity, no dropping)")
    return problems


def check_exportable(config: ModelConfig) -> None:
    """Raise ``ValueError`` listing every option of ``config`` without a Mixtral equivalent."""
    problems = export_problems(config)
    if problems:
        raise ValueError(
            "this model cannot be exported as Hugging Face Mixtral; these megamoe options have no equivalent there: "
            + "; ".join(problems)
        )


def to_hf_config(config: ModelConfig, *, dtype: torch.dtype, special_ids: dict[str, int] | None) -> dict:
    """``config.json`` of a ``MixtralForCausalLM`` computing ``config``'s model (check_exportable first)."""
    out = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.moe_ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,
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
        "num_local_experts": config.num_experts[0],
        "num_experts_per_tok": config.moe_router_topk,
        "router_aux_loss_coef": config.moe_aux_loss_coeff,
        "router_jitter_noise": config.moe_input_jitter_eps,
        "output_router_logits": False,
        "use_cache": True,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "megamoe": {key: getattr(config, key) for key in MEGAMOE_ONLY},
    }
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


def from_hf_config(hf: dict, *, params_dtype: torch.dtype) -> ModelConfig:
    """The megamoe ``ModelConfig`` of a Mixtral ``config.json`` (EP size 1; set the target's later).
    Raises ``ValueError`` naming the HF field megamoe cannot express."""
    if hf.get("model_type") != "mixtral":
        raise ValueError(f"config.json: model_type {hf.get('model_type')!r}; this importer reads 'mixtral'")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    problems = []
    if hf.get("num_key_value_heads", heads) != heads:
        problems.append(
            f"num_key_value_heads {hf['num_key_value_heads']} != num_attention_heads {heads} "
            "(grouped-query attention; megamoe has one KV head per query head)"
        )
    if head_dim * heads != hf["hidden_size"]:
        problems.append(f"head_dim {head_dim} x {heads} heads != hidden_size {hf['hidden_size']}")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (megamoe's experts are SwiGLU: silu)")
    window = hf.get("sliding_window")
    if window is not None and window < hf["max_position_embeddings"]:
        problems.append(f"sliding_window {window} < max_position_embeddings {hf['max_position_embeddings']}")
    if problems:
        raise ValueError("config.json describes a model megamoe cannot express: " + "; ".join(problems))
    extra = hf.get("megamoe", {})
    ffn = hf["intermediate_size"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        ffn_hidden_size=extra.get("ffn_hidden_size", ffn),
        max_position_embeddings=hf["max_position_embeddings"],
        normalization="RMSNorm",
        norm_epsilon=hf.get("rms_norm_eps", 1e-5),
        swiglu=True,
        position_embedding_type="rope",
        rotary_base=_rope_theta(hf),
        add_bias_linear=False,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        init_method_std=hf.get("initializer_range", 0.02),
        hidden_dropout=extra.get("hidden_dropout", 0.0),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        params_dtype=params_dtype,
        num_experts=(hf["num_local_experts"],),
        moe_layer_freq=1,
        moe_router_topk=hf["num_experts_per_tok"],
        moe_ffn_hidden_size=ffn,
        moe_aux_loss_coeff=hf.get("router_aux_loss_coef", 0.0),
        moe_z_loss_coeff=extra.get("moe_z_loss_coeff", 0.0),
        moe_router_pre_softmax=extra.get("moe_router_pre_softmax", False),
        moe_router_renormalize=extra.get("moe_router_renormalize", True),
        moe_input_jitter_eps=hf.get("router_jitter_noise", 0.0),
        moe_token_drop_policy=extra.get("moe_token_drop_policy", "probs"),
        moe_grouped_gemm=extra.get("moe_grouped_gemm", True),
    )
