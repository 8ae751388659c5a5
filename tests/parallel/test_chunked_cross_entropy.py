"""``--cross-entropy-chunk-size``: the output layer and cross entropy taken a chunk of tokens at a
time compute the loss and gradients of the plain path (``F.linear`` + the vocab-parallel cross
entropy), at TP 1 and 2, with vocabulary padding, a loss mask and a chunk size that does not
divide the tokens; no tensor of the size of the logits is kept for backward; and fp16 gradients
are not flushed to zero by the small per-token weights.  References in fp64."""

import torch
import torch.nn.functional as F

from megamoe.parallel.cross_entropy import chunked_linear_cross_entropy, vocab_parallel_cross_entropy
from megamoe.parallel.state import single_rank_layout
from tests.harness import current_layout, run_distributed

TOKENS, HIDDEN, VOCAB, PADDED = 14, 8, 37, 40  # rank 1 of TP 2 holds 17 ids and 3 padding rows
CHUNK = 4


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN, generator=g)
    weight = torch.randn(PADDED, HIDDEN, generator=g) * 0.5
    weight[VOCAB:] = 0.0
    target = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    mask = (torch.rand(TOKENS, generator=g) > 0.3).float()
    return x.to(dtype), weight.to(dtype), target, mask / mask.sum()


def _reference(x, weight, target, token_weights, scale, vocab=VOCAB):
    """fp64: the loss and the gradients of x and of the full weight (rows past ``vocab``: padding)."""
    x = x.double().requires_grad_()
    weight = weight.double().requires_grad_()
    loss = (F.cross_entropy(x @ weight[:vocab].t(), target, reduction="none") * token_weights.double()).sum()
    (loss * scale).backward()
    return loss.detach(), x.grad, weight.grad


def _chunked_body(rank, world):
    layout = current_layout()
    x, weight, target, token_weights = _inputs()
    loss_ref, gx_ref, gw_ref = _reference(x, weight, target, token_weights, scale=3.5)
    shard = PADDED // world
    local_weight = weight[rank * shard : (rank + 1) * shard].clone().requires_grad_()
    x = x.clone().requires_grad_()
    loss = chunked_linear_cross_entropy(x, local_weight, target, token_weights, vocab_start=rank * shard,
                                        vocab_size=VOCAB, layout=layout, chunk_size=CHUNK)
    (loss * 3.5).backward()
    # x's gradient here is this rank's part: the TP all-reduce of it is tp_input's backward.
    gx = x.grad.clone()
    torch.distributed.all_reduce(gx, group=layout.tp_group)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(local_weight.grad.double(), gw_ref[rank * shard : (rank + 1) * shard], rtol=1e-5,
                               atol=1e-7)
    with torch.no_grad():
        again = chunked_linear_cross_entropy(x, local_weight, target, token_weights, vocab_start=rank * shard,
                                             vocab_size=VOCAB, layout=layout, chunk_size=CHUNK)
    assert torch.equal(again, loss.detach())


def test_chunked_loss_and_gradients_match_the_reference_at_tensor_parallel_1_and_2():
    run_distributed(_chunked_body, 1, tensor_model_parallel_size=1)
    run_distributed(_chunked_body, 2, tensor_model_parallel_size=2)


def test_no_logits_sized_tensor_is_kept_for_backward():
    tokens, vocab = 64, 512
    x = torch.randn(tokens, HIDDEN, requires_grad=True)
    weight = torch.randn(vocab, HIDDEN, requires_grad=True)
    target = torch.randint(0, vocab, (tokens,))
    token_weights = torch.full((tokens,), 1.0 / tokens)
    layout = single_rank_layout()

    def kept_elements(run):
        kept = []

        def pack(t):
            kept.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return max(kept)

    plain = kept_elements(lambda: (vocab_parallel_cross_entropy(
        F.linear(x, weight), target, vocab_start=0, vocab_size=vocab, layout=layout) * token_weights).sum())
    chunked = kept_elements(lambda: chunked_linear_cross_entropy(
        x, weight, target, token_weights, vocab_start=0, vocab_size=vocab, layout=layout, chunk_size=16))
    assert plain == tokens * vocab
    assert chunked == vocab * HIDDEN  # the weight's gradient; the largest logits ever held are one chunk's


def test_fp16_gradients_of_small_token_weights_are_not_flushed_to_zero():
    """A mean over many tokens gives each token a weight far below fp16's smallest normal number
    once multiplied into a softmax; the gradients must still carry the fp32 values.  Measured: 2.6e-4
    (input) and 3.3e-4 (weight) relative; with the weights applied unscaled in fp16, 5.2e-3."""
    tokens, vocab = 2048, 4096  # softmax ~ 1/vocab times weight 1/tokens: ~1e-7, below fp16's normals
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, HIDDEN, generator=g).half()
    weight = (torch.randn(vocab, HIDDEN, generator=g) * 0.3).half()
    target = torch.randint(0, vocab, (tokens,), generator=g)
    token_weights = torch.full((tokens,), 1.0 / tokens)
    _, gx_ref, gw_ref = _reference(x, weight, target, token_weights, scale=1.0, vocab=vocab)
    x, weight = x.requires_grad_(), weight.requires_grad_()
    chunked_linear_cross_entropy(x, weight, target, token_weights, vocab_start=0, vocab_size=vocab,
                                 layout=single_rank_layout(), chunk_size=1024).backward()
    for got, want in ((x.grad, gx_ref), (weight.grad, gw_ref)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 1e-3, f"fp16 gradient off by {err:.1e} relative"


def test_chunked_by_default_on_cuda_only_and_an_explicit_size_wins():
    from megamoe.model.execution import CUDA_CROSS_ENTROPY_CHUNK, ExecutionConfig

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    default = ExecutionConfig()
    assert default.cross_entropy_chunk_for(cuda) == CUDA_CROSS_ENTROPY_CHUNK > 0
    assert default.cross_entropy_chunk_for(cpu) == 0
    for size in (0, 7):
        given = ExecutionConfig(cross_entropy_chunk_size=size)
        assert given.cross_entropy_chunk_for(cuda) == given.cross_entropy_chunk_for(cpu) == size
