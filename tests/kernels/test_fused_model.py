"""The model takes the fused kernels where ``megamoe.kernels.use_fused`` allows them (on CUDA with
Triton), and not with ``--no-fused-kernels``: a tiny MoE GPT (RoPE, SwiGLU experts and a dense
SwiGLU layer) has the plain path's loss and parameter gradients in fp32 with the fused SwiGLU,
RoPE, cross entropy and MoE combine, both with the LM head chunked and not; with every kernel
failing its start-up check (two wrong, two raising) the model computes exactly what the plain
model computes, running none of them; torch.compile traces the fused ops (custom ops, the model's
lazy import of them) in one graph."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megamoe.model.execution import ExecutionConfig
from megamoe.model.gpt import GPTModel
from megamoe.model.mlp import activation
from megamoe.model.rope import apply_rotary
from megamoe.parallel.cross_entropy import vocab_parallel_cross_entropy
from megamoe.parallel.state import single_rank_layout
from megamoe import kernels
from megamoe.kernels import guard
from tests.kernels.interpreted import DEVICE, FP32, break_kernel, fused_here, guarded_here, kernel_module
from tests.tiny_moe import tiny_config

for _name in ("swiglu", "rotary", "cross_entropy", "moe"):
    kernel_module(_name)
CONFIG = tiny_config(num_layers=2, moe_layer_freq=(1, 0))
FUSED_OPS = {"megamoe::swiglu", "megamoe::swiglu_backward", "megamoe::rotary", "megamoe::cross_entropy_stats",
             "megamoe::cross_entropy_logits_grad", "megamoe::moe_combine", "megamoe::moe_combine_backward"}


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def _step(execution: ExecutionConfig):
    layout = single_rank_layout(CONFIG.experts_by_layer())
    model = GPTModel(CONFIG, layout, execution, device=DEVICE).initialize(seed=3)
    g = torch.Generator().manual_seed(0)
    tokens, labels = (torch.randint(0, CONFIG.vocab_size, (2, 16), generator=g).to(DEVICE) for _ in range(2))
    with _OpNames() as ops:
        out = model(tokens, labels)
        out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out.loss.detach(), grads, ops.names & FUSED_OPS


@pytest.mark.parametrize("chunk", [0, 12])
def test_the_model_on_fused_kernels_matches_the_plain_model(chunk):
    plain_loss, plain_grads, plain_ops = _step(ExecutionConfig(cross_entropy_chunk_size=chunk, fused_kernels=False))
    with fused_here():
        off_loss, _, off_ops = _step(ExecutionConfig(cross_entropy_chunk_size=chunk, fused_kernels=False))
        loss, grads, ops = _step(ExecutionConfig(cross_entropy_chunk_size=chunk))
    assert not plain_ops and not off_ops and torch.equal(off_loss, plain_loss), "--no-fused-kernels ran a kernel"
    assert ops == FUSED_OPS
    torch.testing.assert_close(loss, plain_loss, **FP32)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, **FP32, msg=lambda m, name=name: f"{name}: {m}")


def test_with_every_kernel_failing_its_check_the_model_computes_what_the_plain_model_computes(monkeypatch):
    plain_loss, plain_grads, _ = _step(ExecutionConfig(fused_kernels=False))
    guarded_here(monkeypatch)
    for kernel, how in zip(kernels.KERNELS, ("wrong", "raises", "wrong", "raises")):
        break_kernel(monkeypatch, kernel, how)
    kernels.use_fused("swiglu", True, torch.zeros(1, device=DEVICE))  # the checks, run here: _step records ops
    assert all(guard._verdicts[str(DEVICE)].values()), "every kernel is off"
    loss, grads, ops = _step(ExecutionConfig())
    assert not ops and torch.equal(loss, plain_loss)
    for name, grad in plain_grads.items():
        assert torch.equal(grads[name], grad), name


def test_torch_compile_traces_the_fused_kernels_in_one_graph():
    layout = single_rank_layout()

    def step(h, x, cos, sin, logits, target):
        loss = vocab_parallel_cross_entropy(logits, target, vocab_start=0, vocab_size=10, layout=layout)
        return activation(h, True).sum() + apply_rotary(x, cos, sin).sum() + loss.sum()

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(4, 16, generator=g), torch.randn(1, 2, 5, 8, generator=g), torch.randn(5, 8, generator=g),
            torch.randn(5, 8, generator=g), torch.randn(3, 12, generator=g), torch.tensor([1, 2, 9])]
    args = [a.to(DEVICE).requires_grad_(i in (0, 1, 4)) for i, a in enumerate(args)]
    with fused_here():
        eager = step(*args)
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(compiled, eager, **FP32)
    assert torch.autograd.grad(compiled, args[0])[0].shape == args[0].shape
