"""GPT decoder (dense or MoE) with tensor-parallel layers.

Shapes: ``b`` micro-batch, ``s`` sequence, ``h`` hidden, ``V/TP`` this rank's padded vocabulary.

    tokens [b, s] -> embedding [b, s, h] -> num_layers x TransformerLayer -> final norm
    -> output layer (vocab-parallel logits [b, s, V/TP], never gathered)
    -> vocab-parallel cross entropy -> lm_loss (mean over the tokens with loss_mask = 1)

With sequence parallelism (``layout.sequence_parallel``) the embedding is reduce-scattered, so
norms, dropout, residuals and the MoE blocks see this TP rank's ``[b, s / TP, h]``; the TP
layers all-gather the sequence before their column-parallel GEMM and reduce-scatter after the
row-parallel one, and the output layer gathers it once more.

A layer whose index is in ``config.moe_layers`` uses an MoE block instead of the dense MLP; the
MoE block returns its auxiliary (load-balancing and z) losses already multiplied by their
coefficients, and the model adds their sum to ``GPTOutput.loss`` so that they enter the
backward exactly once and are scaled like the main loss by whoever scales ``loss``.  With
``--multi-latent-attention`` the layers' attention is MLA (``megamoe.model.mla``); with
``--mtp-num-layers`` the multi-token-prediction depths (``megamoe.model.mtp``) follow the final
norm and their scaled loss joins ``GPTOutput.loss`` the same way.

With pipeline parallelism (``layout.pp_size > 1``) a rank's model is its stage: only the layers
of ``layout.model_chunks``, under their global index (``layers.{i}``, so parameter names and
checkpoints are those of PP 1), the embedding on the first stage, the final norm and output layer
on the last, with the MTP depths (and, with tied embeddings or MTP, a copy of the input embedding
there, its gradient reduced with the first stage's: ``ParamMeta.pipeline_tied``).  The schedule
(``megamoe.training.pipeline``) runs ``run_chunk`` for each model chunk and ``head_losses`` on
the last stage; ``forward`` is the whole model's (PP 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.model.attention import SelfAttention
from megamoe.model.config import ModelConfig
from megamoe.model.execution import ExecutionConfig
from megamoe.model.mla import MultiLatentAttention
from megamoe.model.mlp import MLP
from megamoe.model.mtp import MTPDepth, shifted
from megamoe.model.norm import Norm
from megamoe.model.recompute import recomputed
from megamoe.parallel.cross_entropy import chunked_linear_cross_entropy, vocab_parallel_cross_entropy
from megamoe.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, padded_vocab_size
from megamoe.parallel.mappings import tp_input
from megamoe.parallel.params import initialize_module_, retag, tag_param
from megamoe.parallel.state import ParallelState


@dataclass
class GPTOutput:
    lm_loss: torch.Tensor | None  # scalar fp32, mean over masked tokens; None without labels
    aux_loss: torch.Tensor  # scalar fp32: sum over MoE layers of coeff * (aux, z) losses
    logits: torch.Tensor | None  # [b, s, V/TP] vocab-parallel; only when no labels were given
    moe_stats: list = field(default_factory=list)  # one entry per MoE layer (see megamoe.model.moe)
    mtp_loss: torch.Tensor | None = None  # scalar fp32: mean over the MTP depths of their LM losses
    mtp_loss_scaling_factor: float = 0.0

    @property
    def loss(self) -> torch.Tensor:
        """What the training step back-propagates: the LM loss plus the auxiliary and scaled MTP losses."""
        loss = self.lm_loss + self.aux_loss
        if self.mtp_loss is not None:
            loss = loss + self.mtp_loss_scaling_factor * self.mtp_loss
        return loss


def hidden_dropout(x: torch.Tensor, p: float, training: bool, layout: ParallelState) -> torch.Tensor:
    """Dropout on the residual stream.  Replicated over TP it draws from the default RNG stream
    (the same mask on every TP rank); with sequence parallelism each TP rank holds other
    positions, so it draws from the model-parallel stream."""
    if p == 0.0 or not training:
        return x
    if layout.sequence_parallel:
        with layout.rng.fork():
            return F.dropout(x, p, training)
    return F.dropout(x, p, training)


def _token_weights(labels: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """``[b, s]`` fp32 weights whose weighted sum of the token losses is the LM loss: the mean
    over the micro-batch's tokens, or over those ``loss_mask`` keeps (0 when it keeps none)."""
    if loss_mask is None:
        return torch.full(labels.shape, 1.0 / labels.numel(), dtype=torch.float32, device=labels.device)
    mask = loss_mask.to(torch.float32)
    return mask / mask.sum().clamp(min=1.0)


class LayerStack(nn.Module):
    """The decoder layers a rank holds, registered under their global index (``layers.{i}``):
    all of them at PP 1, one stage's at PP > 1.  ``stack[i]`` is global layer ``i``; iteration
    and ``items()`` go in layer order."""

    def __init__(self, layers: dict[int, nn.Module]) -> None:
        super().__init__()
        for index in sorted(layers):
            self.add_module(str(index), layers[index])

    def __getitem__(self, index: int) -> nn.Module:
        return self._modules[str(index)]

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def items(self) -> list[tuple[int, nn.Module]]:
        return [(int(name), layer) for name, layer in self._modules.items()]


def _run_layers(layers, x: torch.Tensor):
    """``x`` through ``layers`` in order; returns the output and the MoE layers' aux results."""
    auxes = []
    for layer in layers:
        x, aux = layer(x)
        if aux is not None:
            auxes.append(aux)
    return x, auxes


class TransformerLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; returns (x, moe aux or None)."""

    def __init__(
        self, config: ModelConfig, layer_number: int, layout: ParallelState, execution: ExecutionConfig, *,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        dtype = execution.params_dtype
        self.input_norm = Norm(config, dtype=dtype, device=device)
        attention = MultiLatentAttention if config.multi_latent_attention else SelfAttention
        self.attention = attention(config, layout, dtype=dtype, fused_kernels=execution.fused_kernels, device=device)
        self.post_attention_norm = Norm(config, dtype=dtype, device=device)
        self.is_moe = config.is_moe_layer(layer_number)
        if self.is_moe:
            from megamoe.model.moe.layer import MoELayer

            self.mlp = MoELayer(config, layer_number, layout, dtype=dtype, grouped_gemm=execution.moe_grouped_gemm,
                                fused_kernels=execution.fused_kernels, device=device)
        else:
            self.mlp = MLP(config, layout, dtype=dtype, fused_kernels=execution.fused_kernels, device=device)
        self.hidden_dropout = config.hidden_dropout
        self.layout = layout

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return hidden_dropout(x, self.hidden_dropout, self.training, self.layout)

    def forward(self, x: torch.Tensor):
        x = x + self._dropout(self.attention(self.input_norm(x)))
        if self.is_moe:
            out, aux = self.mlp(self.post_attention_norm(x))
        else:
            out, aux = self.mlp(self.post_attention_norm(x)), None
        return x + self._dropout(out), aux


class GPTModel(nn.Module):
    """The model as ``layout``'s rank holds it: parameters of that rank's shapes, and a forward
    whose collectives run over ``layout``'s groups.  A layout without process groups
    (``build_parallel_state(..., create_groups=False)``) builds and initialises any rank of any
    layout in one process (a forward then needs TP 1 and EP 1).  ``layout`` must have been built
    with ``config.experts_by_layer()`` (it gives each MoE layer its EP size); ``execution`` says
    how the model runs (precision, recomputation, chunked cross entropy, GEMM path).  With PP > 1
    it is ``layout``'s stage (see the module docstring)."""

    def __init__(self, config: ModelConfig, layout: ParallelState, execution: ExecutionConfig | None = None, *,
                 device: torch.device | None = None) -> None:
        super().__init__()
        execution = execution or ExecutionConfig()
        config.check_tensor_parallel(tensor_model_parallel_size=layout.tp_size,
                                     expert_tensor_parallel_size=layout.etp_size)
        self.config = config
        self.execution = execution
        self.layout = layout
        # (refused by the arguments: the last stage's MTP depths would need the position embeddings too)
        assert not (layout.pp_size > 1 and config.mtp_num_layers and config.position_embedding_type == "learned_absolute")
        held = layout.layers(config.num_layers)
        chunks = layout.model_chunks or (range(config.num_layers),)
        # (first, end, recompute) spans of global layers, per model chunk: --recompute-* counts
        # the layers of each chunk (each stage's, as in Megatron).
        what = "--num-layers" if layout.pp_size == 1 else "the layers of a pipeline chunk,"
        self.chunk_spans = [[(chunk.start + a, chunk.start + b, r) for a, b, r in execution.layer_chunks(len(chunk), what)]
                            for chunk in chunks]
        first, last = layout.is_first_stage, layout.is_last_stage
        tied = not config.untie_embeddings_and_output_weights
        # The last stage uses the input embedding too: as the output layer, or in the MTP depths.
        shared = tied or bool(config.mtp_num_layers)
        dtype = execution.params_dtype
        padded_vocab = padded_vocab_size(config.vocab_size, layout.tp_size, config.make_vocab_size_divisible_by)
        self.vocab_start = layout.tp_rank * padded_vocab // layout.tp_size  # this TP rank's first logit
        self.word_embeddings = None
        if first or (last and shared):
            self.word_embeddings = VocabParallelEmbedding(
                config.vocab_size,
                config.hidden_size,
                layout=layout,
                init_std=config.init_method_std,
                pad_multiple=config.make_vocab_size_divisible_by,
                dtype=dtype,
                device=device,
            )
            if shared and layout.pp_size > 1:
                retag(self.word_embeddings.weight, pipeline_tied=True)
        self.position_embeddings = None
        if config.position_embedding_type == "learned_absolute" and first:
            self.position_embeddings = tag_param(
                nn.Parameter(torch.empty(config.max_position_embeddings, config.hidden_size, dtype=dtype, device=device)),
                init_std=config.init_method_std,
            )
        self.layers = LayerStack({i: TransformerLayer(config, i, layout, execution, device=device) for i in held})
        self.final_norm = Norm(config, dtype=dtype, device=device) if last else None
        self.output_layer = None
        if config.untie_embeddings_and_output_weights and last:
            self.output_layer = ColumnParallelLinear(
                config.hidden_size,
                padded_vocab,
                layout=layout,
                bias=False,
                init_std=config.init_method_std,
                dtype=dtype,
                device=device,
            )
            retag(self.output_layer.weight, unpadded_size=config.vocab_size)
        self.mtp = None
        if config.mtp_num_layers and last:
            self.mtp = nn.ModuleList(
                MTPDepth(config, layout, TransformerLayer(config, layer, layout, execution, device=device), dtype=dtype,
                         device=device)
                for layer in config.mtp_layers
            )

    def initialize(self, seed: int) -> "GPTModel":
        """Layout-independent initialisation (see ``megamoe.parallel.params``)."""
        initialize_module_(self, seed, self.layout)
        return self

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> GPTOutput:
        """tokens, labels, loss_mask: ``[b, s]``.  Returns the losses, or the local logits when
        ``labels`` is None."""
        assert self.layout.pp_size == 1, "a pipeline stage runs its chunks through megamoe.training.pipeline"
        x, auxes = self.run_chunk(0, tokens)
        aux_total = torch.zeros((), device=x.device, dtype=torch.float32)
        moe_stats = []
        for aux in auxes:
            aux_total = aux_total + aux.loss
            moe_stats.append(aux.stats)
        if labels is None:
            logits = F.linear(tp_input(x, self.layout), self._output_weight())
            return GPTOutput(lm_loss=None, aux_loss=aux_total, logits=logits, moe_stats=moe_stats)
        lm_loss, mtp_loss, mtp_auxes = self.head_losses(x, tokens, labels, loss_mask)
        for aux in mtp_auxes:
            aux_total = aux_total + aux.loss
            moe_stats.append(aux.stats)
        return GPTOutput(lm_loss=lm_loss, aux_loss=aux_total, logits=None, moe_stats=moe_stats, mtp_loss=mtp_loss,
                         mtp_loss_scaling_factor=self.config.mtp_loss_scaling_factor if mtp_loss is not None else 0.0)

    def run_chunk(self, chunk: int, inputs: torch.Tensor):
        """Model chunk ``chunk`` (of ``layout.model_chunks``; 0 at PP 1) on ``inputs``: the tokens
        ``[b, s]`` for the model's first chunk, else the previous chunk's hidden states ``[b, s, h]``
        (``[b, s / TP, h]`` with sequence parallelism).  Returns its output hidden states, after the
        final norm for the model's last chunk, and its MoE layers' aux results, in layer order."""
        if self.layout.is_first_stage and chunk == 0:
            s = inputs.shape[1]
            max_positions = self.config.max_position_embeddings  # parse_config checks --seq-length against it
            assert max_positions is None or s <= max_positions, f"sequence length {s} > {max_positions} positions"
            x = self._embed(inputs)
        else:
            x = inputs
        auxes = []
        for first, end, recompute in self.chunk_spans[chunk]:
            span = [self.layers[i] for i in range(first, end)]
            if self.training and recompute:
                x, span_auxes = recomputed(self.layout.rng, _run_layers, span, x)
            else:
                x, span_auxes = _run_layers(span, x)
            auxes.extend(span_auxes)
        if self.layout.is_last_stage and chunk == len(self.chunk_spans) - 1:
            x = self.final_norm(x)
        return x, auxes

    def head_losses(self, x: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
                    loss_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, list]:
        """The losses of the last chunk's output ``x``: the LM loss (mean over the tokens
        ``loss_mask`` keeps), and with MTP the mean of the depths' LM losses (``tokens`` feed their
        embeddings) and their MoE aux results; ``(lm_loss, None, [])`` without MTP."""
        weights = _token_weights(labels, loss_mask)
        lm_loss = self._lm_loss(x, labels, weights)
        if self.mtp is None:
            return lm_loss, None, []
        mtp_losses, auxes = [], []
        for k, depth in enumerate(self.mtp, start=1):
            x, aux = depth(x, self._embed(torch.roll(tokens, -k, dims=1)))
            if aux is not None:
                auxes.append(aux)
            mtp_losses.append(self._lm_loss(x, *shifted(labels, weights, k)))
        return lm_loss, torch.stack(mtp_losses).mean(), auxes

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens ``[b, s]`` -> ``[b, s, h]`` (with sequence parallelism ``[b, s / TP, h]``)."""
        x = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            first = self.layout.tp_rank * x.shape[1] if self.layout.sequence_parallel else 0
            x = x + self.position_embeddings[first : first + x.shape[1]]
        return hidden_dropout(x, self.config.hidden_dropout, self.training, self.layout)

    def _output_weight(self) -> torch.Tensor:
        return self.output_layer.weight if self.output_layer is not None else self.word_embeddings.weight

    def _lm_loss(self, x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum(weights * cross entropy)`` of the output layer on ``x`` (after the final norm)
        against ``labels`` ``[b, s]``; chunked by ``ExecutionConfig.cross_entropy_chunk_for`` x's device."""
        x = tp_input(x, self.layout)
        chunk_size = self.execution.cross_entropy_chunk_for(x.device)
        if chunk_size:
            return chunked_linear_cross_entropy(
                x.flatten(0, 1),
                self._output_weight(),
                labels.flatten(),
                weights.flatten(),
                vocab_start=self.vocab_start,
                vocab_size=self.config.vocab_size,
                layout=self.layout,
                chunk_size=chunk_size,
                fused=self.execution.fused_kernels,
            )
        token_loss = vocab_parallel_cross_entropy(
            F.linear(x, self._output_weight()),
            labels,
            vocab_start=self.vocab_start,
            vocab_size=self.config.vocab_size,
            layout=self.layout,
            fused=self.execution.fused_kernels,
        )
        return (token_loss * weights).sum()
