"""The RNG tracker gives replicated streams where data is replicated and distinct ones where it is
sharded; the vocab-parallel cross entropy equals torch's on the full logits; the norm fallback
(no apex) computes the textbook formula."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megamoe.model.config import ModelConfig
from megamoe.model.norm import Norm
from megamoe.parallel.cross_entropy import vocab_parallel_cross_entropy
from megamoe.parallel.random import model_parallel_seed
from tests.harness import current_layout, run_distributed


def _gather_world(x):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return parts


def _rng_body(rank, world):
    state = current_layout()
    model_parallel_seed(42, state)
    before = torch.rand(4)
    with state.rng.fork():
        sharded = torch.rand(4)
    after = torch.rand(4)
    defaults = _gather_world(before)
    forks = _gather_world(sharded)
    for r in range(world):
        assert torch.equal(defaults[r], defaults[0]), "default stream must be identical on every rank"
        same_tp_rank = (r % state.tp_size) == state.tp_rank
        assert torch.equal(forks[r], sharded) == same_tp_rank, (r, "model-parallel stream must differ across TP")
    model_parallel_seed(42, state)
    first, second = torch.rand(4), torch.rand(4)
    assert torch.equal(first, before) and torch.equal(second, after), "fork() must not disturb the default stream"


def test_rng_streams_follow_tensor_parallel_sharding():
    run_distributed(_rng_body, 4, tensor_model_parallel_size=2)


def _cross_entropy_body(rank, world):
    state = current_layout()
    vocab, padded = 300, 512  # the padding (ids 300..511) must be excluded from the softmax
    g = torch.Generator().manual_seed(3)
    full = torch.randn(5, 7, padded, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.randint(0, vocab, (5, 7), generator=g)
    local_size = padded // state.tp_size
    start = state.tp_rank * local_size
    local = full.detach()[..., start : start + local_size].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, target, vocab_start=start, vocab_size=vocab, layout=state)
    reference = F.cross_entropy(full[..., :vocab].reshape(-1, vocab), target.reshape(-1), reduction="none").view(5, 7)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=1e-7)
    weights = torch.rand(5, 7, dtype=torch.float64, generator=g)
    (loss * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(local.grad.double(), full.grad[..., start : start + local_size], rtol=1e-6, atol=1e-7)
    pad_from = max(0, vocab - start)
    if pad_from < local_size:
        assert local.grad[..., pad_from:].abs().sum() == 0, "padding ids must get no gradient"


def test_vocab_parallel_cross_entropy_matches_torch():
    run_distributed(_cross_entropy_body, 4, tensor_model_parallel_size=4)


def _norm_body(rank, world):
    for kind in ("RMSNorm", "LayerNorm"):
        norm = Norm(ModelConfig(vocab_size=10, hidden_size=16, num_attention_heads=2, normalization=kind),
                    use_apex=False)
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
            if norm.bias is not None:
                norm.bias.copy_(torch.linspace(-1, 1, 16))
        x = torch.randn(3, 16)
        if kind == "RMSNorm":
            expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
        else:
            mean = x.mean(-1, keepdim=True)
            var = x.var(-1, unbiased=False, keepdim=True)
            expected = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias
        torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)


def test_norm_fallback_without_apex_is_the_textbook_formula():
    run_distributed(_norm_body, 1, tensor_model_parallel_size=1)
