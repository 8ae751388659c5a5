"""What ``--cross-entropy-chunk-size`` keeps for backward: the output layer and cross entropy of one
micro-batch, plain (``F.linear`` + the vocab-parallel cross entropy) against chunked, on one CPU rank.

    python bench/bench_cross_entropy.py                          # 2048 tokens, hidden 256, vocab 32000
    python bench/bench_cross_entropy.py --tokens 4096 --chunks 512 2048

Printed per path:

* ``kept``: bytes of the distinct tensors autograd keeps between forward and backward (recorded
  with ``saved_tensors_hooks``); the plain path keeps the fp32 softmax ``[tokens, vocab]``, the
  chunked one the input's gradient ``[tokens, hidden]`` and the weight's in fp32 ``[vocab, hidden]``.
* ``largest``: the largest of them, and ``logits_chunk``: the fp32 logits alive at once in forward.
* ``loss`` and the largest relative difference of the gradients to the plain path's (fp32).
* ``cpu_s``: forward + backward seconds on this CPU, for orientation only (the GPU figure is owed).

Then the same counts by formula at moe-1b-4e's output layer (16384 tokens per micro-batch, hidden
2048, vocabulary 32000, bf16 weights), which is where the GPU run would see them.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from megamoe.parallel.cross_entropy import chunked_linear_cross_entropy, vocab_parallel_cross_entropy
from megamoe.parallel.state import single_rank_layout


def _run(path, x, weight, target, token_weights, chunk):
    layout = single_rank_layout()
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if path == "plain":
            token_loss = vocab_parallel_cross_entropy(F.linear(x, weight), target, vocab_start=0,
                                                      vocab_size=weight.shape[0], layout=layout)
            loss = (token_loss * token_weights).sum()
        else:
            loss = chunked_linear_cross_entropy(x, weight, target, token_weights, vocab_start=0,
                                                vocab_size=weight.shape[0], layout=layout, chunk_size=chunk)
    loss.backward()
    seconds = time.perf_counter() - start
    return loss.item(), x.grad, weight.grad, kept, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 1024])
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.hidden)
    weight = torch.randn(args.vocab, args.hidden) * 0.02
    target = torch.randint(0, args.vocab, (args.tokens,))
    token_weights = torch.full((args.tokens,), 1.0 / args.tokens)

    print(f"tokens {args.tokens}, hidden {args.hidden}, vocab {args.vocab}, fp32, 1 CPU rank")
    print(f"{'path':>14} {'kept MiB':>9} {'largest MiB':>12} {'logits_chunk MiB':>17} {'loss':>9} "
          f"{'max grad diff':>14} {'cpu_s':>6}")
    mib = 2.0**20
    plain = _run("plain", x, weight, target, token_weights, 0)
    rows = [("plain", plain, args.tokens)] + [
        (f"chunk {c}", _run("chunked", x, weight, target, token_weights, c), c) for c in args.chunks]
    for name, (loss, gx, gw, kept, seconds), chunk_tokens in rows:
        diff = max(((gx - plain[1]).abs().max() / plain[1].abs().max()).item(),
                   ((gw - plain[2]).abs().max() / plain[2].abs().max()).item())
        print(f"{name:>14} {sum(kept.values()) / mib:9.1f} {max(kept.values()) / mib:12.1f} "
              f"{min(chunk_tokens, args.tokens) * args.vocab * 4 / mib:17.1f} {loss:9.5f} {diff:14.1e} "
              f"{seconds:6.2f}")

    tokens, hidden, vocab = 16384, 2048, 32000
    print(f"\nmoe-1b-4e output layer by formula (tokens {tokens}, hidden {hidden}, vocab {vocab}, bf16):")
    print(f"  plain:   fp32 softmax {tokens * vocab * 4 / 2**30:.2f} GiB + the bf16 input "
          f"{tokens * hidden * 2 / 2**30:.2f} GiB kept")
    print(f"  chunked: input gradient {tokens * hidden * 2 / 2**30:.2f} GiB + fp32 weight gradient "
          f"{vocab * hidden * 4 / 2**30:.2f} GiB kept; fp32 logits of 1024 tokens "
          f"{1024 * vocab * 4 / 2**30:.2f} GiB alive at once")


if __name__ == "__main__":
    main()
