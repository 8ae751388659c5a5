"""Megatron-LM flags that megamoe accepts so that a Megatron launch script runs as it is.

Each of these flags selects, in Megatron, something megamoe always does or does not need: a
kernel, a fusion, a communication overlap, a file-reading or logging extra, a size of 1 for a
parallelism it does not have.  None of them changes what is computed.  Given with a value that
describes what megamoe does, the flag is accepted and the run's log says, once, what megamoe
does instead; with any other value it is a ``ValueError`` naming the flag and the values that
would be valid.  Flags whose effect megamoe reproduces are real flags of its config dataclasses;
flags whose effect it does not reproduce are not here: argparse refuses them as unknown.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

SWITCH = None  # the flag takes no value
ANY_INT = ()  # the flag takes an integer, and every value means the same here


@dataclass(frozen=True)
class MegatronFlag:
    name: str
    accepts: tuple[str, ...] | None  # valid values; SWITCH or ANY_INT
    meaning: str  # what megamoe does, which the flag then describes
    several: bool = False  # the flag takes one or more of ``accepts`` (nargs="+")
    # (value, parsed flags) -> the megamoe flag and value it contradicts, or None
    contradicts: Callable[[object, argparse.Namespace], str | None] | None = None

    @property
    def dest(self) -> str:
        return "megatron_" + self.name.lstrip("-").replace("-", "_")


MEGATRON_FLAGS = (
    MegatronFlag("--use-mcore-models", SWITCH, "megamoe has one model implementation"),
    MegatronFlag("--transformer-impl", ("local", "transformer_engine"),
                 "megamoe's own layers run; TransformerEngine is not used"),
    MegatronFlag("--use-flash-attn", SWITCH, "attention is torch SDPA, which runs flash attention where the GPU has it"),
    MegatronFlag("--attention-backend", ("auto", "flash", "fused", "unfused", "local"),
                 "attention is torch SDPA, which picks its kernel"),
    MegatronFlag("--no-masked-softmax-fusion", SWITCH, "SDPA applies the causal mask inside its kernel"),
    MegatronFlag("--attention-softmax-in-fp32", SWITCH, "SDPA accumulates the softmax in fp32"),
    MegatronFlag("--no-bias-swiglu-fusion", SWITCH, "SwiGLU is not fused with a bias"),
    MegatronFlag("--no-bias-gelu-fusion", SWITCH, "GeLU is not fused with a bias"),
    MegatronFlag("--no-bias-dropout-fusion", SWITCH, "dropout is not fused with a bias"),
    MegatronFlag("--no-rope-fusion", SWITCH, "RoPE is plain torch (fused by --compile)"),
    MegatronFlag("--no-gradient-accumulation-fusion", SWITCH,
                 "weight gradients are added into the fp32 main grads after each backward"),
    MegatronFlag("--accumulate-allreduce-grads-in-fp32", SWITCH,
                 "gradients are accumulated and reduced in fp32 main grads"),
    MegatronFlag("--distributed-backend", ("nccl", "gloo"), "the backend follows --device: NCCL on cuda, gloo on cpu"),
    MegatronFlag("--context-parallel-size", ("1",), "megamoe has no context parallelism"),
    MegatronFlag("--moe-token-dispatcher-type", ("alltoall", "flex"),
                 "tokens are dispatched by all-to-all over the EP group (flex, DeepEP/HybridEP's CUDA kernels for "
                 "the same exchange, runs as this all-to-all)"),
    MegatronFlag("--moe-flex-dispatcher-backend", ("deepep", "hybridep"),
                 "tokens are dispatched by megamoe's all-to-all over the EP group"),
    MegatronFlag("--moe-router-fusion", SWITCH,
                 "the router's scores, top-k and auxiliary losses are plain torch operations computing the same"),
    MegatronFlag("--moe-permute-fusion", SWITCH, "tokens are permuted by megamoe's sort-based dispatcher"),
    MegatronFlag("--cross-entropy-loss-fusion", SWITCH,
                 "the loss is megamoe's vocab-parallel cross entropy (--cross-entropy-chunk-size bounds its memory)"),
    MegatronFlag("--cross-entropy-fusion-impl", ("native", "te"),
                 "the loss is megamoe's vocab-parallel cross entropy (--cross-entropy-chunk-size bounds its memory)"),
    MegatronFlag("--tp-comm-overlap", SWITCH,
                 "TP collectives run between the GEMMs, not overlapped with them (that needs TransformerEngine's "
                 "userbuffers)"),
    MegatronFlag("--moe-grouped-gemm", SWITCH, "grouped GEMM is the default (--no-moe-grouped-gemm turns it off)"),
    MegatronFlag("--moe-router-dtype", ("fp32",), "router scores and top-k are computed in fp32"),
    MegatronFlag("--rotary-percent", ("1.0", "1"), "RoPE rotates the whole head dimension"),
    MegatronFlag("--no-position-embedding", SWITCH,
                 "no learned position table: positions come from --position-embedding-type rope",
                 contradicts=lambda value, args: f"--position-embedding-type {args.position_embedding_type}"
                 if args.position_embedding_type != "rope" else None),
    MegatronFlag("--optimizer", ("adam",), "the optimizer is Adam with decoupled weight decay (AdamW), as Megatron's adam"),
    MegatronFlag("--dataloader-type", ("single",),
                 "each global batch is the next run of samples of the seeded, precomputed order"),
    MegatronFlag("--num-workers", ANY_INT, "samples are read from the memory-mapped data in the training process"),
    MegatronFlag("--no-mmap-bin-files", SWITCH,
                 "the .bin files are memory-mapped; the samples read are the same"),
    MegatronFlag("--no-create-attention-mask-in-dataloader", SWITCH,
                 "the data loader never builds an attention mask: SDPA applies the causal mask itself"),
    MegatronFlag("--ckpt-format", ("torch", "torch_dist"),
                 "checkpoints are megamoe's sharded format, loadable into any layout"),
    MegatronFlag("--auto-detect-ckpt-format", SWITCH,
                 "--load reads megamoe's sharded format, whatever layout and version saved it"),
    MegatronFlag("--dist-ckpt-strictness",
                 ("assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected", "raise_all",
                  "return_unexpected", "return_all", "ignore_all"),
                 "--load is strict: a checkpoint must hold exactly the model's tensors, and one that differs is "
                 "refused naming what differs, before training"),
    MegatronFlag("--logging-level", ANY_INT, "megamoe's log lines are printed by rank 0 whatever the level"),
    MegatronFlag("--enable-experimental", SWITCH, "megamoe has no experimental code paths to enable"),
    MegatronFlag("--recompute-modules",
                 ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts"),
                 "selective recomputation is core attention's, which SDPA already is (it keeps no attention "
                 "scores); the other modules keep their activations (memory only, the same results: "
                 "--recompute-granularity full recomputes whole layers)", several=True),
    MegatronFlag("--overlap-param-gather", SWITCH,
                 "ZeRO-1's parameter all-gather runs after the optimizer step, not overlapped with the next forward"),
    MegatronFlag("--empty-unused-memory-level", ANY_INT, "the CUDA cache is never emptied between steps"),
)


def add_megatron_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Megatron-LM flags accepted for compatibility (they describe what megamoe does; other values are refused)")
    for f in MEGATRON_FLAGS:
        if f.accepts is SWITCH:
            group.add_argument(f.name, dest=f.dest, action="store_true", help=f.meaning)
        elif f.accepts is ANY_INT:
            group.add_argument(f.name, dest=f.dest, type=int, metavar="N", help=f.meaning)
        elif f.several:
            group.add_argument(f.name, dest=f.dest, nargs="+", metavar="VALUE",
                               help=f"{f.meaning} (valid: {', '.join(f.accepts)})")
        else:
            group.add_argument(f.name, dest=f.dest, metavar="VALUE",
                               help=f"{f.meaning} (valid: {', '.join(f.accepts)})")


def check_megatron_flags(args: argparse.Namespace) -> list[str]:
    """The log lines for the Megatron flags given; raises ValueError for a value megamoe does not
    do or a flag that contradicts megamoe's own."""
    notes = []
    for f in MEGATRON_FLAGS:
        value = getattr(args, f.dest, None)
        if value is None or value is False:
            continue
        values = value if f.several else [value]
        for one in values:
            if f.accepts not in (SWITCH, ANY_INT) and one not in f.accepts:
                raise ValueError(f"{f.name} {one}: megamoe supports only {', '.join(f.accepts)} ({f.meaning})")
        shown = f.name if value is True else f"{f.name} {' '.join(str(v) for v in values)}"
        conflict = f.contradicts(value, args) if f.contradicts else None
        if conflict:
            raise ValueError(f"{shown} contradicts {conflict}")
        notes.append(f"{shown}: accepted for Megatron compatibility; {f.meaning}")
    return notes
