"""ModelConfig: the architecture of a GPT / MoE GPT, validated in one place.

Each field names the Megatron flag that sets it.  ``__post_init__`` checks what the
architecture alone must satisfy; ``check_parallel_layout`` checks what a (TP, DP) layout adds.
Both raise ``ValueError`` with the flags and the valid values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
TOKEN_DROP_POLICIES = ("probs", "position")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
DEFAULT_BIAS_UPDATE_RATE = 1e-3


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


@dataclass
class ModelConfig:
    # --- dense transformer ---
    vocab_size: int  # from the tokenizer; padded to a multiple of 128 x TP inside the model
    num_layers: int = 2  # --num-layers
    hidden_size: int = 64  # --hidden-size
    num_attention_heads: int = 4  # --num-attention-heads
    kv_channels: int | None = None  # --kv-channels: the head dim (default --hidden-size / --num-attention-heads)
    group_query_attention: bool = False  # --group-query-attention: fewer key/value heads than query heads
    num_query_groups: int | None = None  # --num-query-groups: KV heads with GQA (Megatron's default there: 1)
    qk_layernorm: bool = False  # --qk-layernorm: a --normalization over each head's query and key, before RoPE
    ffn_hidden_size: int | None = None  # --ffn-hidden-size (default 4 x hidden)
    max_position_embeddings: int = 128  # --max-position-embeddings
    normalization: str = "RMSNorm"  # --normalization
    norm_epsilon: float = 1e-5  # --norm-epsilon
    swiglu: bool = True  # --swiglu (else GeLU)
    position_embedding_type: str = "rope"  # --position-embedding-type
    rotary_base: float = 10000.0  # --rotary-base
    add_bias_linear: bool = False  # --disable-bias-linear turns it off (Megatron default: on)
    untie_embeddings_and_output_weights: bool = False  # --untie-embeddings-and-output-weights
    init_method_std: float = 0.02  # --init-method-std
    hidden_dropout: float = 0.0  # --hidden-dropout
    attention_dropout: float = 0.0  # --attention-dropout
    params_dtype: torch.dtype = torch.float32  # --bf16 / --fp16
    # --recompute-granularity full: recompute each layer's activations in backward (None: store them)
    recompute_granularity: str | None = None
    recompute_num_layers: int | None = None  # --recompute-num-layers: the first N layers (default: all)

    # --- mixture of experts ---
    # --num-experts: one value for every MoE layer, or one per MoE layer (pyramid models).
    num_experts: tuple[int, ...] = ()
    # --moe-layer-freq: every N-th layer is MoE (int), or an explicit 0/1 pattern per layer.
    moe_layer_freq: int | tuple[int, ...] = 1
    moe_router_topk: int = 2  # --moe-router-topk
    moe_ffn_hidden_size: int | None = None  # --moe-ffn-hidden-size (default: ffn_hidden_size)
    moe_aux_loss_coeff: float = 0.0  # --moe-aux-loss-coeff
    moe_z_loss_coeff: float = 0.0  # --moe-z-loss-coeff
    moe_router_pre_softmax: bool = False  # --moe-router-pre-softmax: softmax before top-k
    moe_router_renormalize: bool = True  # --no-moe-router-renormalize turns off top-k renormalisation
    moe_router_score_function: str = "softmax"  # --moe-router-score-function: softmax or sigmoid
    # --moe-router-enable-expert-bias: aux-loss-free balancing, a per-expert bias in the top-k choice only
    moe_router_enable_expert_bias: bool = False
    # --moe-router-bias-update-rate: the bias step per optimizer step (None: DEFAULT_BIAS_UPDATE_RATE)
    moe_router_bias_update_rate: float | None = None
    moe_router_topk_scaling_factor: float | None = None  # --moe-router-topk-scaling-factor (None: 1)
    moe_router_num_groups: int | None = None  # --moe-router-num-groups: expert groups for group-limited routing
    moe_router_group_topk: int | None = None  # --moe-router-group-topk: groups each token may use
    moe_input_jitter_eps: float = 0.0  # --moe-input-jitter-eps (0: off)
    moe_expert_capacity_factor: float | None = None  # --moe-expert-capacity-factor (None: dropless)
    moe_eval_capacity_factor: float | None = None  # --moe-eval-capacity-factor (default: training's)
    moe_token_drop_policy: str = "probs"  # --moe-token-drop-policy
    moe_shared_expert_intermediate_size: int | None = None  # --moe-shared-expert-intermediate-size
    moe_grouped_gemm: bool = True  # --no-moe-grouped-gemm: use the batched fallback
    # --expert-model-parallel-size: one value, or one per MoE layer.
    expert_model_parallel_size: tuple[int, ...] = (1,)

    _moe_layers: tuple[int, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        self.num_experts = _as_tuple(self.num_experts)
        self.expert_model_parallel_size = _as_tuple(self.expert_model_parallel_size) or (1,)
        if isinstance(self.moe_layer_freq, (list, tuple)):
            self.moe_layer_freq = tuple(int(v) for v in self.moe_layer_freq)
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        self._validate()
        self._moe_layers = self._compute_moe_layers()
        self._validate_moe()
        self._validate_router()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        positive = {
            "--num-layers": self.num_layers,
            "--hidden-size": self.hidden_size,
            "--num-attention-heads": self.num_attention_heads,
            "--ffn-hidden-size": self.ffn_hidden_size,
            "--max-position-embeddings": self.max_position_embeddings,
            "vocabulary size": self.vocab_size,
        }
        for flag, value in positive.items():
            if value < 1:
                raise ValueError(f"{flag} must be a positive integer, got {value}")
        if self.kv_channels is not None and self.kv_channels < 1:
            raise ValueError(f"--kv-channels must be a positive integer, got {self.kv_channels}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"--hidden-size {self.hidden_size} is not divisible by "
                f"--num-attention-heads {self.num_attention_heads}"
            )
        if self.num_query_groups is not None and not self.group_query_attention:
            raise ValueError("--num-query-groups needs --group-query-attention")
        groups = self.num_kv_heads
        if groups < 1 or self.num_attention_heads % groups != 0:
            raise ValueError(
                f"--num-query-groups {groups} must divide --num-attention-heads {self.num_attention_heads}"
            )
        if self.position_embedding_type == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"rope needs an even head dim (--kv-channels, default --hidden-size / --num-attention-heads), got {self.head_dim}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"--normalization {self.normalization!r}: valid values are {list(NORMALIZATIONS)}")
        if self.position_embedding_type not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"--position-embedding-type {self.position_embedding_type!r}: "
                f"valid values are {list(POSITION_EMBEDDINGS)}"
            )
        if self.recompute_granularity not in (None, "full"):
            raise ValueError(f"--recompute-granularity {self.recompute_granularity!r}: valid values are ['full']")
        if self.recompute_num_layers is not None and not 1 <= self.recompute_num_layers <= self.num_layers:
            raise ValueError(
                f"--recompute-num-layers {self.recompute_num_layers} must be in [1, --num-layers {self.num_layers}]"
            )
        for flag, value in (("--hidden-dropout", self.hidden_dropout), ("--attention-dropout", self.attention_dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{flag} must be in [0, 1), got {value}")

    def _compute_moe_layers(self) -> tuple[int, ...]:
        if not self.num_experts:
            return ()
        freq = self.moe_layer_freq
        if isinstance(freq, tuple):
            if len(freq) != self.num_layers or any(v not in (0, 1) for v in freq):
                raise ValueError(
                    f"--moe-layer-freq pattern {list(freq)} must have one 0/1 entry per layer "
                    f"(--num-layers {self.num_layers})"
                )
            return tuple(i for i, v in enumerate(freq) if v)
        if freq < 1:
            raise ValueError(f"--moe-layer-freq must be >= 1 or a 0/1 pattern, got {freq}")
        return tuple(i for i in range(self.num_layers) if i % freq == 0)

    def _per_moe_layer(self, values: tuple[int, ...], flag: str) -> tuple[int, ...]:
        n = len(self._moe_layers)
        if len(values) == 1:
            return values * n
        if len(values) != n:
            raise ValueError(
                f"{flag} got {len(values)} values {list(values)}; give one value or one per MoE layer "
                f"({n} MoE layers: {list(self._moe_layers)})"
            )
        return values

    def _validate_moe(self) -> None:
        if not self.num_experts:
            return
        experts = self._per_moe_layer(self.num_experts, "--num-experts")
        eps = self._per_moe_layer(self.expert_model_parallel_size, "--expert-model-parallel-size")
        for layer, e, ep in zip(self._moe_layers, experts, eps):
            if e < 1:
                raise ValueError(f"--num-experts must be >= 1, got {e} for layer {layer}")
            if ep < 1 or e % ep != 0:
                valid = [d for d in range(1, e + 1) if e % d == 0]
                raise ValueError(
                    f"--num-experts {e} (layer {layer}) is not divisible by --expert-model-parallel-size {ep}; "
                    f"valid expert-parallel sizes: {valid}"
                )
            if not 1 <= self.moe_router_topk <= e:
                raise ValueError(f"--moe-router-topk {self.moe_router_topk} must be in [1, {e}] (--num-experts {e})")
        if self.moe_token_drop_policy not in TOKEN_DROP_POLICIES:
            raise ValueError(
                f"--moe-token-drop-policy {self.moe_token_drop_policy!r}: valid values are {list(TOKEN_DROP_POLICIES)}"
            )
        for flag, value in (
            ("--moe-expert-capacity-factor", self.moe_expert_capacity_factor),
            ("--moe-eval-capacity-factor", self.moe_eval_capacity_factor),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
        for flag, value in (("--moe-aux-loss-coeff", self.moe_aux_loss_coeff), ("--moe-z-loss-coeff", self.moe_z_loss_coeff)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")

    def _validate_router(self) -> None:
        if self.moe_router_score_function not in SCORE_FUNCTIONS:
            raise ValueError(
                f"--moe-router-score-function {self.moe_router_score_function!r}: valid values are {list(SCORE_FUNCTIONS)}"
            )
        sigmoid = self.moe_router_score_function == "sigmoid"
        if sigmoid and self.moe_router_pre_softmax:
            raise ValueError("--moe-router-pre-softmax applies to softmax scores, not --moe-router-score-function sigmoid")
        if self.moe_router_enable_expert_bias and not sigmoid:
            raise ValueError("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid")
        if self.moe_router_bias_update_rate is not None:
            if not self.moe_router_enable_expert_bias:
                raise ValueError("--moe-router-bias-update-rate needs --moe-router-enable-expert-bias")
            if self.moe_router_bias_update_rate <= 0:
                raise ValueError(f"--moe-router-bias-update-rate must be > 0, got {self.moe_router_bias_update_rate}")
        factor = self.moe_router_topk_scaling_factor
        if factor is not None and factor <= 0:
            raise ValueError(f"--moe-router-topk-scaling-factor must be > 0, got {factor}")
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if (groups is None) != (group_topk is None):
            raise ValueError("--moe-router-num-groups and --moe-router-group-topk go together: give both or neither")
        if groups is None:
            return
        k = self.moe_router_topk
        if groups < 1:
            raise ValueError(f"--moe-router-num-groups must be >= 1, got {groups}")
        if not 1 <= group_topk <= min(groups, k):
            raise ValueError(
                f"--moe-router-group-topk {group_topk} must be in [1, min(--moe-router-num-groups {groups}, "
                f"--moe-router-topk {k})] (each group is scored by its top k / group-topk experts)"
            )
        for e in sorted(set(self.num_experts)):
            if e % groups != 0:
                raise ValueError(f"--moe-router-num-groups {groups} does not divide --num-experts {e}")
            if group_topk * (e // groups) < k:
                raise ValueError(
                    f"--moe-router-group-topk {group_topk} groups of {e // groups} experts (--num-experts {e} / "
                    f"--moe-router-num-groups {groups}) hold fewer than --moe-router-topk {k} experts"
                )

    def check_parallel_layout(self, *, tensor_model_parallel_size: int, data_parallel_size: int) -> None:
        """Raise ``ValueError`` if this model cannot be laid out at (TP, DP)."""
        tp = tensor_model_parallel_size
        checks = {"--num-query-groups": self.num_kv_heads} if self.group_query_attention else {}
        checks |= {
            "--num-attention-heads": self.num_attention_heads,
            "--hidden-size": self.hidden_size,
            "--ffn-hidden-size": self.ffn_hidden_size,
        }
        if self.num_experts:
            checks["--moe-ffn-hidden-size"] = self.moe_ffn_hidden_size
        if self.moe_shared_expert_intermediate_size:
            checks["--moe-shared-expert-intermediate-size"] = self.moe_shared_expert_intermediate_size
        for flag, value in checks.items():
            if value % tp != 0:
                valid = [d for d in range(1, value + 1) if value % d == 0]
                raise ValueError(
                    f"{flag} {value} is not divisible by --tensor-model-parallel-size {tp}; "
                    f"valid tensor-parallel sizes for it: {valid}"
                )
        for ep in set(self.moe_ep_sizes()):
            if data_parallel_size % ep != 0:
                valid = [d for d in range(1, data_parallel_size + 1) if data_parallel_size % d == 0]
                raise ValueError(
                    f"--expert-model-parallel-size {ep} does not divide the data-parallel size "
                    f"{data_parallel_size}; valid values: {valid}"
                )

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        if self.kv_channels is not None:
            return self.kv_channels
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads: --num-query-groups with --group-query-attention (default 1), else one per query head."""
        if not self.group_query_attention:
            return self.num_attention_heads
        return 1 if self.num_query_groups is None else self.num_query_groups

    @property
    def expert_bias_update_rate(self) -> float:
        """The expert-bias step of --moe-router-bias-update-rate, with its default."""
        rate = self.moe_router_bias_update_rate
        return DEFAULT_BIAS_UPDATE_RATE if rate is None else rate

    def recomputes_layer(self, layer: int) -> bool:
        if self.recompute_granularity is None:
            return False
        return self.recompute_num_layers is None or layer < self.recompute_num_layers

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the MoE layers."""
        return self._moe_layers

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self._moe_layers

    def num_experts_for_layer(self, layer: int) -> int:
        return self._per_moe_layer(self.num_experts, "--num-experts")[self._moe_layers.index(layer)]

    def ep_size_for_layer(self, layer: int) -> int:
        eps = self._per_moe_layer(self.expert_model_parallel_size, "--expert-model-parallel-size")
        return eps[self._moe_layers.index(layer)]

    def moe_ep_sizes(self) -> tuple[int, ...]:
        """The EP size of every MoE layer, in layer order (pass ``set()`` of it to the groups)."""
        return tuple(self.ep_size_for_layer(layer) for layer in self._moe_layers)
