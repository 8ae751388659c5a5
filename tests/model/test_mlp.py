"""The SwiGLU activation: the textbook values and gradients, while keeping less for backward."""

import torch
import torch.nn.functional as F

from megamoe.model.mlp import activation


def _reference(h):
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def test_swiglu_matches_the_composed_ops_in_fp64():
    h = torch.randn(5, 3, 16, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: activation(x, True, False), (h,))
    g = torch.randn(5, 3, 8, dtype=torch.float64)
    (grad,) = torch.autograd.grad(activation(h, True, False), h, g)
    (want,) = torch.autograd.grad(_reference(h), h, g)
    torch.testing.assert_close(activation(h, True, False), _reference(h), rtol=0, atol=0)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


def _saved_bytes(fn, h):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(h)
    return sum(storages.values())


def test_swiglu_keeps_only_its_input_for_backward():
    h = torch.randn(64, 2 * 128, requires_grad=True)
    ours, composed = _saved_bytes(lambda x: activation(x, True, False), h), _saved_bytes(_reference, h)
    assert ours == h.numel() * h.element_size()
    assert composed == 1.5 * ours
