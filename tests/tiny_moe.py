"""The tiny MoE GPT the model, optimizer, training and checkpoint tests build, its data, and the
pieces that train it in a given layout.  Test modules import from here; they never import each other.

``tiny_config(**fields)`` is the one base of every tiny model: 2 layers, hidden 32, 4 heads, FFN
48, sequence 16, vocabulary 200, 4 experts of FFN 32 in every layer, top-2, aux and z losses on,
SwiGLU, no biases, tied embeddings.  A test states what its model changes as ``fields``
(``num_experts=None`` for a dense model).  ``TINY_ARCH`` is that architecture as fields; the
end-to-end tests' command line (``tests.fixtures.TINY_MOE``) is derived from it.

``model_config`` is the optimizer tests' variant: 3 layers (MoE, dense, MoE), a shared expert and
biases (TP-sharded and TP-replicated, dense and expert), so every kind of parameter and every
reduction group is present.  The vocabulary pads to 256 at TP 1 and 2: padding rows exist.

The data: ``GLOBAL_BATCH`` sequences per step, micro-batch size 1, so every layout sees the same
micro-batches; DP rank d takes micro-batches ``[d * n, (d + 1) * n)`` of each step.

The reference (``reference_run``) is independent of megamoe.optim: one process, TP = EP = DP = 1,
the full global-batch loss (mean of the micro-batch losses) back-propagated, then
``torch.nn.utils.clip_grad_norm_`` and a plain ``torch.optim.AdamW`` in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megamoe.model.config import ModelConfig
from megamoe.model.execution import ExecutionConfig
from megamoe.model.gpt import GPTModel
from megamoe.model.moe.balancing import biased_routers, update_expert_biases
from megamoe.optim import MixedPrecisionOptimizer, OptimizerConfig
from megamoe.parallel.gather import gather_full_state
from megamoe.parallel.params import param_meta
from megamoe.parallel.random import model_parallel_seed
from megamoe.parallel.state import single_rank_layout
from tests.harness import init_layout

SEED = 1234
VOCAB = 200
SEQ = 16
GLOBAL_BATCH = 8
# adam_eps 1e-6, not 1e-8: Adam divides by sqrt(v) + eps, so an element whose gradient is near eps turns
# last-bit differences of the summation order into a visible part of a step.  With 1e-8, another CPU's
# GEMM kernels alone moved one element of a TP 2 run by 5.7e-3 lr from the reference after 4 steps.
HYPER = dict(lr=3e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-6, clip_grad=0.3)


TINY_ARCH = dict(
    vocab_size=VOCAB,
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    ffn_hidden_size=48,
    max_position_embeddings=SEQ,
    num_experts=4,
    moe_ffn_hidden_size=32,
    moe_router_topk=2,
    moe_aux_loss_coeff=1e-2,
    moe_z_loss_coeff=1e-3,
    swiglu=True,
    add_bias_linear=False,
)


def tiny_config(**fields) -> ModelConfig:
    """The tiny base model with ``fields`` changed."""
    return ModelConfig(**{**TINY_ARCH, **fields})


def model_config(**fields) -> ModelConfig:
    """The optimizer tests' model (MoE, dense, MoE); ``fields`` override it."""
    return tiny_config(**{**dict(
        num_layers=3,
        moe_layer_freq=(1, 0, 1),
        moe_shared_expert_intermediate_size=16,
        add_bias_linear=True,
    ), **fields})


def micro_batches(step: int, vocab: int = VOCAB) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The step's global batch as micro-batches of one sequence: (tokens [1, SEQ], labels [1, SEQ])."""
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return [(data[i : i + 1, :-1], data[i : i + 1, 1:]) for i in range(GLOBAL_BATCH)]


def local_micro_batches(step: int, layout, vocab: int = VOCAB, micro_batch_size: int = 1) -> list:
    """``layout``'s DP rank's share of ``micro_batches(step)``, consecutive sequences joined into
    micro-batches of ``micro_batch_size``."""
    state = layout
    batches = micro_batches(step, vocab)
    n = len(batches) // state.dp_size
    mine = batches[state.dp_rank * n : (state.dp_rank + 1) * n]
    return [tuple(torch.cat(parts) for parts in zip(*mine[i : i + micro_batch_size]))
            for i in range(0, n, micro_batch_size)]


def expert_biases(model) -> torch.Tensor:
    """Every router's expert bias, concatenated in layer order (empty without them)."""
    biases = [router.expert_bias for router in biased_routers(model)]
    return torch.cat(biases).clone() if biases else torch.zeros(0)


def decays(name: str, param: torch.Tensor) -> bool:
    """The weight-decay rule, written from the names, independently of the parameter tags the
    optimizer reads: no decay on biases (``bias``, the experts' ``fc1_bias``/``fc2_bias``) and
    norm weights (1-D per layer); decay on every weight matrix (attention, MLPs, router, experts,
    shared expert), the embeddings and the output layer."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or leaf.endswith("_bias") or "norm" in name:
        return False
    assert param.dim() >= 2, f"{name}: a 1-D parameter that is neither a bias nor a norm"
    return True


def reference_run(steps: int, *, clip_grad: float = HYPER["clip_grad"], arch: dict | None = None) -> dict:
    """Single-process fp32 training of ``model_config``; builds its own TP=1/EP=1 groups and tears
    them down.  ``arch``: model field overrides; expert biases, if any, are updated after every step."""
    config = model_config(**(arch or {}))
    model = GPTModel(config, single_rank_layout(config.experts_by_layer())).initialize(SEED)
    params = list(model.parameters())
    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": HYPER["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=HYPER["lr"],
        betas=(HYPER["adam_beta1"], HYPER["adam_beta2"]),
        eps=HYPER["adam_eps"],
    )
    out = {"loss": [], "mtp": [], "l2": [], "inf": [], "bias": [], "grads0": None}
    for step in range(steps):
        opt.zero_grad()
        outputs = [model(tokens, labels) for tokens, labels in micro_batches(step)]
        loss = sum(o.loss for o in outputs) / len(outputs)
        loss.backward()
        out["loss"].append(loss.item())
        if outputs[0].mtp_loss is not None:
            out["mtp"].append((sum(o.mtp_loss for o in outputs) / len(outputs)).item())
        out["inf"].append(max(p.grad.abs().max().item() for p in params))
        if step == 0:
            out["grads0"] = gather_full_state(model, model.layout, grads=True)
        norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else math.inf)
        out["l2"].append(norm.item())
        opt.step()
        update_expert_biases(model, [o.moe_stats for o in outputs])
        out["bias"].append(expert_biases(model))
    out["params"] = gather_full_state(model, model.layout)
    return out


def build_model(config: ModelConfig, tp: int = 1, ep_sizes=(1,), *, sequence_parallel: bool = False,
                etp: int | None = None, dtype=torch.float32, seed: int = SEED, pipeline: dict | None = None,
                **execution) -> GPTModel:
    """Groups of the layout (TP ``tp``, EP ``ep_sizes``: one value or one per MoE layer, ETP
    ``etp``; ``pipeline``: ``ParallelConfig``'s pipeline fields) over the running world, the
    model-parallel RNG seeded, and ``config``'s model (this rank's stage) in ``dtype`` initialised
    from ``seed``; ``execution``: other ``ExecutionConfig`` fields."""
    layout = init_layout(tp, ep_sizes, etp=etp, sp=sequence_parallel, experts_by_layer=config.experts_by_layer(),
                         pipeline_num_layers=config.num_layers, **(pipeline or {}))
    model_parallel_seed(SEED, layout)
    return GPTModel(config, layout, ExecutionConfig(params_dtype=dtype, **execution)).initialize(seed)


def build_optimizer(model: GPTModel, *, zero: bool, **overrides) -> MixedPrecisionOptimizer:
    """``HYPER``'s optimizer with ZeRO-1 ``zero``, in the model's dtype; ``overrides`` change its config."""
    fields = {**HYPER, "use_distributed_optimizer": zero, "params_dtype": model.execution.params_dtype, **overrides}
    return MixedPrecisionOptimizer(model, OptimizerConfig(**fields), model.layout)


def build(tp: int, ep_sizes, *, zero: bool, dtype=torch.float32, arch: dict | None = None,
          execution: dict | None = None, sequence_parallel: bool = False, etp: int | None = None,
          pipeline: dict | None = None, **overrides):
    """Groups, ``model_config`` model and optimizer of one layout (EP ``ep_sizes``, one per MoE
    layer); ``arch`` overrides model fields, ``execution`` ``ExecutionConfig`` ones, ``overrides``
    optimizer ones; ``etp``: the expert-TP size; ``pipeline``: ``ParallelConfig``'s pipeline fields."""
    config = model_config(**(arch or {}))
    model = build_model(config, tp, ep_sizes, sequence_parallel=sequence_parallel, etp=etp, dtype=dtype,
                        pipeline=pipeline, **(execution or {}))
    return model, build_optimizer(model, zero=zero, **overrides)


def forward_backward(model, opt, step: int, moe_stats: list | None = None, mtp_losses: list | None = None) -> float:
    """This rank's micro-batches of ``step`` through forward and backward; returns the global
    loss (mean over DP of this rank's mean micro-batch loss).  Appends each micro-batch's MoE
    stats to ``moe_stats`` when given, and the global MTP loss (the same mean) to ``mtp_losses``."""
    batches = local_micro_batches(step, model.layout, model.config.vocab_size)
    opt.zero_grad()
    total = torch.zeros(2)  # loss, MTP loss
    for tokens, labels in batches:
        out = model(tokens, labels)
        loss = out.loss / len(batches)
        opt.scale_loss(loss).backward()
        total[0] += loss.detach().float()
        if out.mtp_loss is not None:
            total[1] += out.mtp_loss.detach().float() / len(batches)
        if moe_stats is not None:
            moe_stats.append(out.moe_stats)
    state = model.layout
    dist.all_reduce(total, group=state.dp_group)
    if mtp_losses is not None:
        mtp_losses.append(total[1].item() / state.dp_size)
    return total[0].item() / state.dp_size


def train(model, opt, steps, first_step: int = 0) -> dict:
    """``steps`` training steps, as the trainer's ``train_step`` takes them (expert biases included)."""
    out = {"loss": [], "mtp": [], "l2": [], "inf": [], "skipped": [], "bias": []}
    for step in range(first_step, first_step + steps):
        moe_stats = []
        out["loss"].append(forward_backward(model, opt, step, moe_stats, out["mtp"] if model.mtp else None))
        result = opt.step()
        if not result.skipped:
            update_expert_biases(model, moe_stats)
        out["l2"].append(result.grad_norm)
        out["inf"].append(result.grad_norm_inf)
        out["skipped"].append(result.skipped)
        out["bias"].append(expert_biases(model))
    return out


def full_params(model) -> dict[str, torch.Tensor]:
    """Full parameters, copied: ``gather_full_state`` returns views of unsharded parameters, which
    the next step would change."""
    return {name: t.clone() for name, t in gather_full_state(model, model.layout).items()}


def assert_params_close(got: dict, want: dict, where: str, *, rtol: float = 1e-5, atol: float = 8e-3 * HYPER["lr"]):
    """Per tensor: ``||got - want|| <= rtol * ||want|| + atol * sqrt(numel)``, every element within ``atol``.

    ``atol`` is 0.8% of one Adam step (lr) per element.  It is needed because Adam divides
    by sqrt(v): an element whose gradient is near ``adam_eps`` turns last-bit differences of the
    reduction order into a visible fraction of one step, which dominates for zero-initialised
    tensors (biases) whose whole value is a few such steps, and for the router's learned bias
    reaches the routing.  Largest element error measured over the layout-invariance layouts:
    5.7e-3 lr (one element of an attention projection at TP=2; 1.3e-3 lr before the router had
    its bias).
    """
    assert got.keys() == want.keys()
    for name, w in want.items():
        g, w = got[name].double(), w.double()
        err, bound = (g - w).norm().item(), rtol * w.norm().item() + atol * w.numel() ** 0.5
        assert err <= bound, f"{where} {name}: ||got - want|| = {err:.2e} > {bound:.2e}"
        torch.testing.assert_close(g, w, rtol=0, atol=atol, msg=lambda m: f"{where} {name}: {m}")


def assert_replicas_identical(model) -> None:
    """Dense params bitwise equal over DP, expert params over their EDP group."""
    state = model.layout
    for name, p in model.named_parameters():
        meta = param_meta(p)
        if meta.is_expert:
            groups = state.experts(meta.expert_parallel_size)
            group, size = groups.edp_group, groups.edp_size
        else:
            group, size = state.dp_group, state.dp_size
        copies = [torch.empty_like(p) for _ in range(size)]
        dist.all_gather(copies, p.detach().contiguous(), group=group)
        for c in copies:
            assert torch.equal(c, copies[0]), f"{name}: replicas differ across {'EDP' if meta.is_expert else 'DP'}"


def train_logged(model, opt, steps: int, first_step: int = 0, micro_batch_size: int = 1) -> dict:
    """``steps`` steps, from global batch ``first_step`` on, through the trainer's own
    ``train_step`` (at PP > 1 with its pipeline schedule), on ``local_micro_batches`` of
    ``micro_batch_size`` with a loss mask, each step's log record from ``IntervalMetrics`` (what rank 0 logs): per step
    ``lm_loss``, ``aux_loss``, ``z_loss``, ``mtp_loss``, ``grad_norm``, ``grad_norm_inf``,
    ``skipped``, and the expert biases of the rank's MoE layers (``{global layer: bias}``); and
    ``pipeline``, the ``PipelineSchedule`` it trained with (None at PP 1)."""
    from megamoe.training.metrics import IntervalMetrics
    from megamoe.training.pipeline import PipelineSchedule
    from megamoe.training.trainer import train_step

    layout, cpu = model.layout, torch.device("cpu")
    n = GLOBAL_BATCH // layout.dp_size // micro_batch_size
    pipeline = (PipelineSchedule(model, opt, num_microbatches=n, micro_batch_size=micro_batch_size, seq_length=SEQ,
                                 device=cpu)
                if layout.pp_size > 1 else None)
    metrics = IntervalMetrics(layout=layout, device=cpu, flops_per_token=0.0, peak_tflops=None)
    keys = ("lm_loss", "aux_loss", "z_loss", "mtp_loss", "grad_norm", "grad_norm_inf")
    out = {key: [] for key in keys} | {"skipped": [], "bias": []}
    for step in range(first_step, first_step + steps):
        # a loss mask that drops some tokens (those divisible by 7), as --eod-mask-loss drops EOD's
        batches = [{"tokens": tokens, "labels": labels, "loss_mask": (tokens % 7 != 0).float()}
                   for tokens, labels in local_micro_batches(step, layout, model.config.vocab_size, micro_batch_size)]
        result = train_step(model, opt, batches, metrics, cpu, None, pipeline)
        metrics.add_step(result, tokens=GLOBAL_BATCH * SEQ)
        record = metrics.finish_interval(step + 1, 0, HYPER["lr"], result)
        for key in keys:
            out[key].append(record[key])
        out["skipped"].append(result.skipped)
        out["bias"].append({i: layer.mlp.router.expert_bias.clone() for i, layer in model.layers.items()
                            if layer.is_moe and layer.mlp.router.expert_bias is not None})
    out["pipeline"] = pipeline
    return out
