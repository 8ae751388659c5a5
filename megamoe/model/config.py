"""ModelConfig: the architecture of a GPT / MoE GPT, validated in one place.

Only what a checkpoint and a Hugging Face ``config.json`` describe lives here: the function the
model computes.  How it is laid out over ranks is ``megamoe.parallel.config.ParallelConfig``;
how it runs (precision, recomputation, chunked cross entropy, the GEMM path) is
``megamoe.model.execution.ExecutionConfig``.  Each field declares the Megatron flag that sets it
(``megamoe.flags``).  ``__post_init__`` checks what the architecture alone must satisfy;
``check_tensor_parallel`` what splitting it over TP adds.  Both raise ``ValueError`` with the
flags and the valid values.
"""

from __future__ import annotations

import argparse
import ast
import math
from dataclasses import dataclass

from megamoe.flags import at_least_one, check_fields, derived, flag, non_negative, positive, probability, to_argv
from megamoe.int_list import IntListAction, divisors, parse_int_list

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
ROPE_TYPES = ("rope", "yarn")
# Megatron's defaults of the MLA dims (used when --multi-latent-attention is given without them).
MLA_DEFAULTS = dict(kv_lora_rank=32, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128)
TOKEN_DROP_POLICIES = ("probs", "position")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")  # see megamoe.model.moe.aux_losses
DEFAULT_BIAS_UPDATE_RATE = 1e-3


def _list_expression(node: ast.AST) -> list[int] | int:
    """The value of Megatron's pattern expressions: integers, lists of them, ``+`` of lists and
    ``*`` of a list by an integer, in parentheses; anything else is refused (never evaluated)."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.List):
        items = [_list_expression(item) for item in node.elts]
        if all(isinstance(item, int) for item in items):
            return items
    if isinstance(node, ast.BinOp):
        left, right = _list_expression(node.left), _list_expression(node.right)
        if isinstance(node.op, ast.Add) and isinstance(left, list) and isinstance(right, list):
            return left + right
        if isinstance(node.op, ast.Mult) and isinstance(left, list) != isinstance(right, list):
            items, times = (left, right) if isinstance(left, list) else (right, left)
            if 0 <= len(items) * times <= 100_000:  # a pattern has one entry per layer
                return items * times
    raise ValueError("not a list expression")


def layer_pattern(text: str) -> int | tuple[int, ...]:
    """--moe-layer-freq: ``"2"`` -> 2 (every 2nd layer), ``"1,0,1,0"`` -> (1, 0, 1, 0), and
    Megatron's Python-list form ``"([0]*3+[1]*58)"`` -> (0, 0, 0, 1, ...), read without eval."""
    if any(c in text for c in "[(*+"):
        try:
            values = _list_expression(ast.parse(text.strip(), mode="eval").body)
        except (SyntaxError, ValueError):
            raise argparse.ArgumentTypeError(
                f"{text!r}: give an integer N, a 0/1 pattern like 1,0,1,0, or a list expression like "
                f"'([0]*3+[1]*58)' (integers, lists, + and *)") from None
        return values if isinstance(values, int) else tuple(values)
    try:
        values = parse_int_list(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give an integer N or a 0/1 pattern like 1,0,1,0") from None
    return values[0] if len(values) == 1 else tuple(values)


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


@dataclass
class ModelConfig:
    """The architecture.  Defaults are the command line's: ``ModelConfig(vocab_size=V)`` is the
    model ``pretrain_moe.py`` builds without model flags."""

    # --- dense transformer ---
    vocab_size: int = derived(help="from the tokenizer (or --vocab-size with --mock-data); padded to a "
                                   "multiple of --make-vocab-size-divisible-by x TP inside the model")
    make_vocab_size_divisible_by: int = flag(128, help="pad the vocabulary (embedding and output rows) to a "
                                                       "multiple of this x TP", check=positive)
    num_layers: int = flag(4, help="transformer layers", check=positive)
    hidden_size: int = flag(128, help="model width", check=positive)
    num_attention_heads: int = flag(4, help="attention heads", check=positive)
    kv_channels: int | None = flag(None, help="the head dim", check=positive,
                                   default_text="--hidden-size / --num-attention-heads")
    group_query_attention: bool = flag(False, help="fewer key/value heads than query heads")
    num_query_groups: int | None = flag(None, help="key/value heads with --group-query-attention", default_text="1")
    qk_layernorm: bool = flag(False, help="a --normalization norm over each query and key head, before RoPE")
    ffn_hidden_size: int | None = flag(None, help="hidden size of the dense MLPs", check=positive,
                                       default_text="4 x --hidden-size")
    max_position_embeddings: int | None = flag(
        None, help="longest sequence the model accepts; sizes the learned_absolute table", check=positive,
        default_text="--seq-length")
    normalization: str = flag("RMSNorm", help="norm of each block and the final norm", choices=NORMALIZATIONS)
    norm_epsilon: float = flag(1e-5, help="epsilon of the norms", check=positive)
    swiglu: bool = flag(False, help="SwiGLU MLPs and experts (else GeLU)")
    position_embedding_type: str = flag("rope", help="position encoding", choices=POSITION_EMBEDDINGS)
    rotary_base: float = flag(10000.0, help="RoPE base (theta)", check=positive)
    rope_type: str | None = flag(None, choices=ROPE_TYPES,
                                 help="rope: plain RoPE; yarn: YaRN-scaled frequencies (--rotary-scaling-factor, "
                                      "--original-max-position-embeddings, --beta-fast/--beta-slow) and attention "
                                      "scale (--mscale, --mscale-all-dim)",
                                 default_text="yarn with --multi-latent-attention, else rope")
    rotary_scaling_factor: float = flag(1.0, help="YaRN: the context-extension factor (1: no extension)",
                                        check=positive)
    original_max_position_embeddings: int = flag(4096, help="YaRN: the context length the RoPE frequencies "
                                                           "were trained for", check=positive)
    beta_fast: float = flag(32.0, help="YaRN: rotations above which a frequency is kept as is", check=positive)
    beta_slow: float = flag(1.0, help="YaRN: rotations below which a frequency is fully interpolated",
                            check=positive)
    mscale: float = flag(1.0, help="YaRN: the cos/sin scale is mscale(factor, --mscale) / mscale(factor, "
                                   "--mscale-all-dim), with mscale(f, m) = 1 + 0.1 m ln f", check=non_negative)
    mscale_all_dim: float = flag(0.0, help="YaRN: MLA's softmax scale is multiplied by mscale(factor, this)^2",
                                 check=non_negative)
    multi_latent_attention: bool = flag(False, help="DeepSeek's multi-latent attention (MLA): keys and values "
                                                    "from a shared compressed latent, a decoupled RoPE key")
    q_lora_rank: int | None = flag(None, help="MLA: rank of the low-rank query projection (none: a plain "
                                              "projection)", check=positive)
    kv_lora_rank: int | None = flag(None, help="MLA: rank of the key/value latent", check=positive,
                                    default_text=f"{MLA_DEFAULTS['kv_lora_rank']} with --multi-latent-attention")
    qk_head_dim: int | None = flag(None, help="MLA: query/key head dim without position embedding",
                                   check=positive,
                                   default_text=f"{MLA_DEFAULTS['qk_head_dim']} with --multi-latent-attention")
    qk_pos_emb_head_dim: int | None = flag(
        None, help="MLA: query/key head dim of the RoPE part (one key part shared by all heads)", check=positive,
        default_text=f"{MLA_DEFAULTS['qk_pos_emb_head_dim']} with --multi-latent-attention")
    v_head_dim: int | None = flag(None, help="MLA: value head dim", check=positive,
                                  default_text=f"{MLA_DEFAULTS['v_head_dim']} with --multi-latent-attention")
    mtp_num_layers: int | None = flag(None, help="multi-token prediction depth: MTP blocks after the last layer, "
                                                 "depth k predicting the token k + 1 ahead", check=non_negative,
                                      default_text="none")
    mtp_loss_scaling_factor: float = flag(0.1, help="the MTP loss added to the LM loss: this x the mean over the "
                                                    "depths of their cross entropies", check=non_negative)
    rotary_seq_len_interpolation_factor: int | None = flag(
        None, help="RoPE position interpolation: positions are divided by this", check=positive, default_text="1")
    add_bias_linear: bool = flag(True, name="--disable-bias-linear", help="no biases in the linear layers")
    untie_embeddings_and_output_weights: bool = flag(False, help="an output layer of its own (else the "
                                                                 "input embedding's transpose)")
    init_method_std: float = flag(0.02, help="std of the normal weight init", check=positive)
    hidden_dropout: float = flag(0.0, help="dropout after attention and MLP", check=probability)
    attention_dropout: float = flag(0.0, help="dropout of the attention probabilities", check=probability)

    # --- mixture of experts ---
    num_experts: tuple[int, ...] = flag(
        (), action=IntListAction, help="experts per MoE layer: one value, or one per MoE layer (space- or "
                                       "comma-separated); none: a dense model")
    moe_layer_freq: int | tuple[int, ...] = flag(
        1, type=layer_pattern, help="every N-th layer is MoE, or a 0/1 pattern per layer: 1,0,1,0")
    moe_router_topk: int = flag(2, help="experts per token, k")
    moe_ffn_hidden_size: int | None = flag(None, help="hidden size of each expert", check=positive,
                                           default_text="--ffn-hidden-size")
    moe_router_load_balancing_type: str = flag(
        "aux_loss", choices=BALANCING_TYPES,
        help="the load-balancing loss: aux_loss over the micro-batch (Switch), seq_aux_loss per sequence "
             "(DeepSeek-V2), global_aux_loss with the expert counts of the whole step on every DP rank; none: no loss")
    moe_aux_loss_coeff: float = flag(0.0, help="weight of the load-balancing loss", check=non_negative)
    moe_z_loss_coeff: float = flag(0.0, help="weight of the router z-loss", check=non_negative)
    moe_router_pre_softmax: bool = flag(False, help="softmax over all experts, then top-k: the weights are the "
                                                    "chosen probabilities, not renormalised (else a softmax over "
                                                    "the top-k logits, which sums to 1)")
    moe_router_renormalize: bool = flag(True, name="--no-moe-router-renormalize",
                                        help="megamoe only (Hugging Face's norm_topk_prob false): with sigmoid scores, "
                                             "keep the raw top-k scores; Megatron always divides them by their sum "
                                             "when k > 1")
    moe_router_score_function: str = flag("softmax", help="router scores", choices=SCORE_FUNCTIONS)
    moe_router_enable_expert_bias: bool = flag(False, help="aux-loss-free balancing: a per-expert bias in the "
                                                           "top-k choice only (sigmoid scores)")
    moe_router_bias_update_rate: float | None = flag(None, help="expert-bias step per optimizer step",
                                                     check=positive, default_text=str(DEFAULT_BIAS_UPDATE_RATE))
    moe_router_topk_scaling_factor: float | None = flag(None, help="multiply the top-k weights by this",
                                                        check=positive, default_text="1")
    moe_router_num_groups: int | None = flag(None, help="expert groups for group-limited routing",
                                             check=at_least_one)
    moe_router_group_topk: int | None = flag(None, help="groups each token may route to (with "
                                                        "--moe-router-num-groups)", check=at_least_one)
    moe_router_force_load_balancing: bool = flag(
        False, help="benchmarking only: route by random logits (the gradient passes to the real ones), so the "
                    "experts get balanced loads whatever the router learns")
    moe_input_jitter_eps: float = flag(0.0, help="multiply the router input by U(1-eps, 1+eps) in training",
                                       check=non_negative)
    moe_expert_capacity_factor: float | None = flag(None, help="token-slots per expert, in units of the even "
                                                    "share", check=positive, default_text="unset: dropless")
    moe_eval_capacity_factor: float | None = flag(None, help="capacity factor in evaluation", check=positive,
                                                  default_text="--moe-expert-capacity-factor")
    moe_token_drop_policy: str = flag("probs", help="which slots an over-capacity expert keeps",
                                      choices=TOKEN_DROP_POLICIES)
    moe_shared_expert_intermediate_size: int | None = flag(None, help="hidden size of a dense shared expert "
                                                           "applied to every token", check=positive)

    _moe_layers: tuple[int, ...] = derived((), help="indices of the MoE layers", init=False)

    def __post_init__(self) -> None:
        self.num_experts = _as_tuple(self.num_experts)
        if isinstance(self.moe_layer_freq, (list, tuple)):
            self.moe_layer_freq = tuple(int(v) for v in self.moe_layer_freq)
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        self._validate()
        self._validate_mla()
        self._moe_layers = self._compute_moe_layers()
        self._validate_moe()
        self._validate_router()

    # ------------------------------------------------------------------ validation
    def _validate_mla(self) -> None:
        """MLA's flags need --multi-latent-attention and exclude the head flags of standard
        attention; with it, the dims not given take Megatron's defaults.  Resolves --rope-type."""
        mla_flags = {"--q-lora-rank": self.q_lora_rank, "--kv-lora-rank": self.kv_lora_rank,
                     "--qk-head-dim": self.qk_head_dim, "--qk-pos-emb-head-dim": self.qk_pos_emb_head_dim,
                     "--v-head-dim": self.v_head_dim}
        if not self.multi_latent_attention:
            given = [name for name, value in mla_flags.items() if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)} need --multi-latent-attention")
        else:
            standard = [name for name, given in (
                ("--group-query-attention", self.group_query_attention),
                ("--num-query-groups", self.num_query_groups is not None),
            ) if given]
            if standard:
                raise ValueError(
                    f"--multi-latent-attention has no {', '.join(standard)}: its heads are sized by --qk-head-dim, "
                    "--qk-pos-emb-head-dim and --v-head-dim, and every head has its own keys and values "
                    "(from one shared latent, --kv-lora-rank)"
                )
            if self.position_embedding_type != "rope":
                raise ValueError("--multi-latent-attention needs --position-embedding-type rope (its keys carry "
                                 "a decoupled RoPE part)")
            for name, value in MLA_DEFAULTS.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
            if self.qk_pos_emb_head_dim % 2 != 0:
                raise ValueError(f"--qk-pos-emb-head-dim must be even (RoPE rotates pairs), got {self.qk_pos_emb_head_dim}")
        if self.rope_type is None:
            self.rope_type = "yarn" if self.multi_latent_attention else "rope"
        if self.rope_type == "rope" and self.rotary_scaling_factor != 1.0:
            raise ValueError(f"--rotary-scaling-factor {self.rotary_scaling_factor} needs --rope-type yarn "
                             "(the default with --multi-latent-attention)")

    def _validate(self) -> None:
        check_fields(self)
        if self.vocab_size < 1:
            raise ValueError(f"vocabulary size must be >= 1, got {self.vocab_size}")
        mla = self.multi_latent_attention
        if not mla and self.kv_channels is None and self.hidden_size % self.num_attention_heads != 0:
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
        if self.position_embedding_type == "rope" and not mla and self.head_dim % 2 != 0:
            raise ValueError(f"rope needs an even head dim (--kv-channels, default --hidden-size / --num-attention-heads), got {self.head_dim}")
        if self.position_embedding_type == "learned_absolute" and self.max_position_embeddings is None:
            raise ValueError("--position-embedding-type learned_absolute needs --max-position-embeddings")

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

    def _per_moe_layer(self, values: tuple[int, ...], option: str) -> tuple[int, ...]:
        n = len(self._moe_layers)
        if len(values) == 1:
            return values * n
        if len(values) != n:
            raise ValueError(
                f"{option} got {len(values)} values {list(values)}; give one value or one per MoE layer "
                f"({n} MoE layers: {list(self._moe_layers)})"
            )
        return values

    def _validate_moe(self) -> None:
        if not self.num_experts:
            return
        experts = self._per_moe_layer(self.num_experts, "--num-experts")
        for layer, e in zip(self._moe_layers, experts):
            if e < 1:
                raise ValueError(f"--num-experts must be >= 1, got {e} for layer {layer}")
            if not 1 <= self.moe_router_topk <= e:
                raise ValueError(f"--moe-router-topk {self.moe_router_topk} must be in [1, {e}] (--num-experts {e})")

    def _validate_router(self) -> None:
        if self.moe_router_load_balancing_type == "none" and self.moe_aux_loss_coeff:
            raise ValueError(f"--moe-router-load-balancing-type none contradicts --moe-aux-loss-coeff "
                             f"{self.moe_aux_loss_coeff}: give one of them")
        sigmoid = self.moe_router_score_function == "sigmoid"
        if self.num_experts and self.moe_router_topk == 1 and not sigmoid and not self.moe_router_pre_softmax:
            raise ValueError("--moe-router-topk 1 with softmax after the top-k gives every token the weight 1.0 and "
                             "the router no gradient: add --moe-router-pre-softmax (as Megatron requires)")
        if not self.moe_router_renormalize and not sigmoid:
            raise ValueError("--no-moe-router-renormalize applies to --moe-router-score-function sigmoid: softmax after "
                             "the top-k sums to 1, and --moe-router-pre-softmax keeps the probabilities (as Megatron)")
        if sigmoid and self.moe_router_pre_softmax:
            raise ValueError("--moe-router-pre-softmax applies to softmax scores, not --moe-router-score-function sigmoid")
        if self.moe_router_enable_expert_bias and not sigmoid:
            raise ValueError("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid")
        if self.moe_router_bias_update_rate is not None and not self.moe_router_enable_expert_bias:
            raise ValueError("--moe-router-bias-update-rate needs --moe-router-enable-expert-bias")
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if (groups is None) != (group_topk is None):
            raise ValueError("--moe-router-num-groups and --moe-router-group-topk go together: give both or neither")
        if groups is None:
            return
        k = self.moe_router_topk
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

    def check_tensor_parallel(self, *, tensor_model_parallel_size: int, expert_tensor_parallel_size: int) -> None:
        """Raise ``ValueError`` if this model's heads and widths cannot be split over TP (and its
        experts over ETP).  What the layout itself must satisfy is ``megamoe.parallel.layout_rules``'s."""
        tp, etp = tensor_model_parallel_size, expert_tensor_parallel_size
        checks = {"--num-query-groups": self.num_kv_heads} if self.group_query_attention else {}
        checks |= {
            "--num-attention-heads": self.num_attention_heads,
            "--hidden-size": self.hidden_size,
            "--ffn-hidden-size": self.ffn_hidden_size,
        }
        if self.num_experts and etp == tp:
            checks["--moe-ffn-hidden-size"] = self.moe_ffn_hidden_size
        if self.moe_shared_expert_intermediate_size:
            checks["--moe-shared-expert-intermediate-size"] = self.moe_shared_expert_intermediate_size
        for name, value in checks.items():
            if value % tp != 0:
                raise ValueError(
                    f"{name} {value} is not divisible by --tensor-model-parallel-size {tp}; "
                    f"valid tensor-parallel sizes for it: {divisors(value)}"
                )
        if self.num_experts and self.moe_ffn_hidden_size % etp != 0:
            value = self.moe_ffn_hidden_size
            raise ValueError(
                f"--moe-ffn-hidden-size {value} is not divisible by --expert-tensor-parallel-size {etp}; "
                f"valid expert-tensor-parallel sizes for it: {divisors(value)}"
            )

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        if self.kv_channels is not None:
            return self.kv_channels
        return self.hidden_size // self.num_attention_heads

    @property
    def mla_query_head_dim(self) -> int:
        """MLA: a query (and key) head's dim, its no-position part and its RoPE part."""
        return self.qk_head_dim + self.qk_pos_emb_head_dim

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads: --num-query-groups with --group-query-attention (default 1), else one per query head."""
        if not self.group_query_attention:
            return self.num_attention_heads
        return 1 if self.num_query_groups is None else self.num_query_groups

    @property
    def output_layer_init_std(self) -> float:
        """Init std of the layers that write into the residual stream (attention output, MLP and
        expert fc2): --init-method-std / sqrt(2 x layers), so the residual's variance does not
        grow with depth (GPT-2's scaled init, as Megatron)."""
        return self.init_method_std / math.sqrt(2.0 * self.num_layers)

    @property
    def expert_bias_update_rate(self) -> float:
        """The expert-bias step of --moe-router-bias-update-rate, with its default."""
        rate = self.moe_router_bias_update_rate
        return DEFAULT_BIAS_UPDATE_RATE if rate is None else rate

    def training_flags(self) -> list[str]:
        """The command-line flags that build this architecture, as ``pretrain_moe.py`` takes them
        (the layout, precision and other run choices are the run's own)."""
        return to_argv(self)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the MoE layers."""
        return self._moe_layers

    @property
    def mtp_layers(self) -> tuple[int, ...]:
        """Layer numbers of the MTP blocks (depth k: ``num_layers + k - 1``), after the decoder's."""
        return tuple(range(self.num_layers, self.num_layers + (self.mtp_num_layers or 0)))

    def decoder_layer_of(self, layer: int) -> int:
        """The decoder layer that ``layer`` is built like: itself, or for an MTP block the last decoder
        layer (MoE when it is, with its experts and EP)."""
        return min(layer, self.num_layers - 1)

    def is_moe_layer(self, layer: int) -> bool:
        return self.decoder_layer_of(layer) in self._moe_layers

    def num_experts_for_layer(self, layer: int) -> int:
        index = self._moe_layers.index(self.decoder_layer_of(layer))
        return self._per_moe_layer(self.num_experts, "--num-experts")[index]

    def experts_by_layer(self) -> dict[int, int]:
        """``{MoE layer index: experts}`` of the decoder: what the parallel layout splits over EP (an
        MTP block takes the EP size of the layer it is built like: ``decoder_layer_of``)."""
        return {layer: self.num_experts_for_layer(layer) for layer in self._moe_layers}
