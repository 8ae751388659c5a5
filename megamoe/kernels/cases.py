"""Each fused kernel's case: inputs at a shape, and a forward and backward through the public
function the model calls with ``fused`` off (the plain PyTorch ops) or on (the kernel where
``megamoe.kernels.use_fused`` allows it).  ``megamoe.kernels.guard`` compares the two at the
``check`` shape (tiny, exercising more than one block of each kernel); ``bench/check_fused_kernels.py``
also times them at the ``moe_1b_4e`` shape (micro batch 8, seq 2048, hidden 2048, 16 heads of 128,
4 SwiGLU experts of ffn 5632 top-2, vocabulary 32000, LM head chunks of 4096 tokens).

The inputs come from a generator of their own on the device: the run's random state is untouched.
The plain paths (``megamoe.model``, ``megamoe.parallel``) import ``megamoe.kernels``: they are
imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megamoe.kernels import KERNELS

Inputs = dict[str, object]
Outputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Case:
    inputs: Callable[..., Inputs]  # (device, dtype, **shape) -> inputs
    run: Callable[[Inputs, bool], Outputs]  # (inputs, fused) -> forward outputs and gradients
    check: dict  # the shape of the start-up check
    moe_1b_4e: dict  # the shape of the benchmark


def _generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def _swiglu_inputs(device, dtype, *, rows: int, width: int) -> Inputs:
    g = _generator(device)
    h = (torch.randn(rows, 2 * width, generator=g, device=device) * 3).to(dtype)
    return {"h": h, "grad": torch.randn(rows, width, generator=g, device=device).to(dtype)}


def _swiglu_run(inputs: Inputs, fused: bool) -> Outputs:
    from megamoe.model.mlp import activation

    h = inputs["h"].detach().requires_grad_()
    out = activation(h, True, fused)
    return {"output": out, "grad h": torch.autograd.grad(out, h, inputs["grad"])[0]}


def _rotary_inputs(device, dtype, *, batch: int, seq: int, heads: int, dim: int) -> Inputs:
    g = _generator(device)
    angles = (torch.rand(seq, dim // 2, generator=g, device=device) * 6).repeat(1, 2)  # rotate-half tables
    return {"cos": angles.cos().to(dtype), "sin": angles.sin().to(dtype),
            # [b, s, heads, (q, k, v), d]: q is the strided view the QKV split makes
            "qkv": torch.randn(batch, seq, heads, 3, dim, generator=g, device=device).to(dtype),
            "grad": torch.randn(batch, heads, seq, dim, generator=g, device=device).to(dtype)}


def _rotary_run(inputs: Inputs, fused: bool) -> Outputs:
    from megamoe.model.rope import apply_rotary

    qkv = inputs["qkv"].detach().requires_grad_()
    out = apply_rotary(qkv[:, :, :, 0].transpose(1, 2), inputs["cos"], inputs["sin"], fused=fused)
    return {"output": out, "grad x": torch.autograd.grad(out, qkv, inputs["grad"])[0]}


def _cross_entropy_inputs(device, dtype, *, tokens: int, hidden: int, vocab: int, padded: int, chunk: int) -> Inputs:
    g = _generator(device)
    x = torch.randn(tokens, hidden, generator=g, device=device).to(dtype)
    weight = (torch.randn(padded, hidden, generator=g, device=device) * 2 / hidden**0.5).to(dtype)
    return {"x": x, "weight": weight, "logits": x @ weight.t(), "vocab": vocab, "chunk": chunk,
            "target": torch.randint(0, vocab, (tokens,), generator=g, device=device),
            "token_weights": torch.rand(tokens, generator=g, device=device)}


def _cross_entropy_run(inputs: Inputs, fused: bool) -> Outputs:
    """The per-token loss and the logits' gradient, and the chunked LM head's loss and input and
    weight gradients (``--cross-entropy-chunk-size``, the CUDA default)."""
    from megamoe.parallel.cross_entropy import chunked_linear_cross_entropy, vocab_parallel_cross_entropy
    from megamoe.parallel.state import single_rank_layout

    target, token_weights = inputs["target"], inputs["token_weights"]
    kw = dict(vocab_start=0, vocab_size=inputs["vocab"], layout=single_rank_layout(), fused=fused)
    logits = inputs["logits"].detach().requires_grad_()
    loss = vocab_parallel_cross_entropy(logits, target, **kw)
    (grad_logits,) = torch.autograd.grad((loss * token_weights).sum(), logits)
    x, weight = inputs["x"].detach().requires_grad_(), inputs["weight"].detach().requires_grad_()
    chunked = chunked_linear_cross_entropy(x, weight, target, token_weights, chunk_size=inputs["chunk"], **kw)
    grad_x, grad_w = torch.autograd.grad(chunked * 3.0, (x, weight))
    return {"loss": loss, "grad logits": grad_logits, "chunked loss": chunked, "chunked grad x": grad_x,
            "chunked grad weight": grad_w}


def _moe_inputs(device, dtype, *, tokens: int, hidden: int, experts: int, topk: int) -> Inputs:
    from megamoe.model.moe.dispatcher import TokenDispatcher
    from megamoe.parallel.state import single_rank_layout

    g = _generator(device)
    ids = torch.rand(tokens, experts, generator=g, device=device).argsort(dim=-1)[:, :topk]  # distinct experts
    dispatcher = TokenDispatcher(single_rank_layout(), num_experts=experts, ep_size=1, fused_kernels=False)
    return {"experts": experts, "plan": dispatcher.plan(ids, None),  # dropless: the fused combine's case
            "x": torch.randn(tokens, hidden, generator=g, device=device).to(dtype),
            "weights": torch.softmax(torch.randn(tokens, topk, generator=g, device=device), dim=-1),
            "grad": torch.randn(tokens, hidden, generator=g, device=device).to(dtype)}


def _moe_run(inputs: Inputs, fused: bool) -> Outputs:
    """dispatch -> a stand-in expert that tells the rows apart (times 1 + row index / 10) -> combine."""
    from megamoe.model.moe.dispatcher import TokenDispatcher
    from megamoe.parallel.state import single_rank_layout

    dispatcher = TokenDispatcher(single_rank_layout(), num_experts=inputs["experts"], ep_size=1, fused_kernels=fused)
    x, weights, plan = (inputs["x"].detach().requires_grad_(), inputs["weights"].detach().requires_grad_(),
                        inputs["plan"])
    rows = dispatcher.dispatch(x, plan)
    scale = 1 + torch.arange(rows.shape[0], device=rows.device, dtype=rows.dtype).unsqueeze(-1) / 10
    out = dispatcher.combine(rows * scale, weights, plan)
    grad_x, grad_weights = torch.autograd.grad(out, (x, weights), inputs["grad"])
    return {"output": out, "grad x": grad_x, "grad weights": grad_weights}


_WIDE = 1100  # more than one block (1024) of the SwiGLU and MoE kernels
_TOKENS = 8 * 2048  # micro batch x seq at moe-1b-4e

CASES = {
    "swiglu": Case(_swiglu_inputs, _swiglu_run, check=dict(rows=4, width=_WIDE),
                   moe_1b_4e=dict(rows=2 * _TOKENS, width=5632)),  # the experts' activation: top-2 rows
    "rotary": Case(_rotary_inputs, _rotary_run, check=dict(batch=2, seq=20, heads=3, dim=12),  # 20: > a block of 16
                   moe_1b_4e=dict(batch=8, seq=2048, heads=16, dim=128)),
    "cross_entropy": Case(_cross_entropy_inputs, _cross_entropy_run,
                          # vocabulary padding; a chunk that does not divide the tokens
                          check=dict(tokens=14, hidden=8, vocab=37, padded=40, chunk=4),
                          moe_1b_4e=dict(tokens=_TOKENS, hidden=2048, vocab=32000, padded=32000, chunk=4096)),
    "moe": Case(_moe_inputs, _moe_run, check=dict(tokens=12, hidden=_WIDE, experts=4, topk=2),
                moe_1b_4e=dict(tokens=_TOKENS, hidden=2048, experts=4, topk=2)),
}
assert tuple(CASES) == KERNELS
