"""Shared pieces of the conversion tests: a small Mixtral-shaped MoE GPT, its data, and the
distributed bodies that train, save, load and step it in a given layout.

The model: 2 layers, both MoE with 4 experts (top-2), SwiGLU, RMSNorm, RoPE, untied embeddings,
no biases, vocabulary 300 (padded to 384 at TP 1 and 512 at TP 2, so padding rows exist), aux
and z losses on.  EP sizes are per MoE layer, so one model can have two.  The data:
``GLOBAL_BATCH`` sequences per step, micro-batches of one sequence; DP rank d takes micro-batches
``[d * n, (d + 1) * n)``: every layout sees the same micro-batches, so the loss of a step does
not depend on the layout.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megamoe.model.config import ModelConfig
from megamoe.model.gpt import GPTModel
from megamoe.optim import MixedPrecisionOptimizer, OptimizerConfig
from megamoe.parallel import state as ps
from megamoe.parallel.gather import gather_full_state
from megamoe.parallel.mappings import gather_from_tp_region
from megamoe.parallel.random import model_parallel_seed
from megamoe.training import checkpoint as ckpt

SEED = 1234
VOCAB = 300
SEQ = 16
GLOBAL_BATCH = 8
HYPER = dict(lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=0.5)


@dataclass(frozen=True)
class Run:
    """A layout: world size, TP, EP per MoE layer, ZeRO-1."""

    world: int
    tp: int
    eps: tuple[int, ...]
    zero: bool


def model_config(eps) -> ModelConfig:
    return ModelConfig(
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
        expert_model_parallel_size=tuple(eps),
        untie_embeddings_and_output_weights=True,
        swiglu=True,
        add_bias_linear=False,
    )


def micro_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return [(data[i : i + 1, :-1], data[i : i + 1, 1:]) for i in range(GLOBAL_BATCH)]


def portable(rank: int, value):
    """What a harness body returns: rank 0's ``value`` as ``torch.save`` bytes, None elsewhere.

    Tensors returned as such travel through shared-memory handles that die with their process;
    bytes do not.  ``unpack`` restores the value."""
    if rank != 0:
        return None
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def unpack(results: list):
    return torch.load(io.BytesIO(results[0]), weights_only=True)


def build(run: Run):
    """Groups, model and optimizer of ``run``'s layout (``ps.destroy_model_parallel`` after)."""
    layout = ps.initialize_model_parallel(run.tp, tuple(set(run.eps)))
    model_parallel_seed(SEED, layout)
    config = model_config(run.eps)
    model = GPTModel(config, layout).initialize(SEED)
    return config, model


def optimizer(model, run: Run) -> MixedPrecisionOptimizer:
    return MixedPrecisionOptimizer(model, OptimizerConfig(**HYPER, use_distributed_optimizer=run.zero), model.layout)


def step(model, opt, index: int) -> float:
    """One optimizer step on global batch ``index``; returns the global loss (lm + aux)."""
    state = ps.get_parallel_state()
    batches = micro_batches(index)
    n = len(batches) // state.dp_size
    opt.zero_grad()
    total = torch.zeros(())
    for tokens, labels in batches[state.dp_rank * n : (state.dp_rank + 1) * n]:
        loss = model(tokens, labels).loss / n
        opt.scale_loss(loss).backward()
        total += loss.detach()
    dist.all_reduce(total, group=state.dp_group)
    result = opt.step()
    assert not result.skipped
    return total.item() / state.dp_size


def full_params(model) -> dict[str, torch.Tensor]:
    """Full parameters, copied: ``gather_full`` returns views of unsharded parameters, which the
    next step would change."""
    return {name: t.clone() for name, t in gather_full_state(model, model.layout).items()}


def full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        logits = gather_from_tp_region(model(tokens).logits, model.layout)[..., :VOCAB]
    model.train()
    return logits


def train_save_continue(rank, world, run: Run, save_root: str, steps: int, tokens: torch.Tensor) -> bytes | None:
    """Train ``steps`` steps in ``run``'s layout, save, then take one more step (the reference a
    converted checkpoint must reproduce).  Returns the saved model's logits on ``tokens`` and
    full parameters, and the next step's loss and full parameters."""
    config, model = build(run)
    opt = optimizer(model, run)
    for index in range(steps):
        step(model, opt, index)
    ckpt.save_checkpoint(
        save_root,
        iteration=steps,
        consumed_samples=steps * GLOBAL_BATCH,
        model=model,
        optimizer=opt,
        model_config=config,
        use_distributed_optimizer=run.zero,
        args={"seed": SEED},
    )
    logits = full_logits(model, tokens)
    saved = full_params(model)
    loss = step(model, opt, steps)
    params = full_params(model)
    ps.destroy_model_parallel()
    return portable(rank, {"logits": logits, "saved_params": saved, "next_loss": loss, "next_params": params})


def load_and_step(rank, world, runs: list[tuple[Run, str]], next_index: int) -> bytes | None:
    """For each (layout, save root): load the checkpoint as the trainer does, take step
    ``next_index``, and return (``portable``) the loaded and the updated full parameters and the loss."""
    out = []
    for run, root in runs:
        config, model = build(run)
        loaded = ckpt.open_checkpoint(root, config)
        loaded.load_model(model)
        opt = optimizer(model, run)
        loaded.load_optimizer(opt, model)
        loaded.restore_rng()
        loaded = full_params(model)
        loss = step(model, opt, next_index)
        out.append({"loaded_params": loaded, "loss": loss, "params": full_params(model)})
        ps.destroy_model_parallel()
    return portable(rank, out)
