"""A NaN in any gradient on any rank is seen by every rank: the step is skipped everywhere, and
every rank names the same ranks (one flag agreed in the grad norm's collective).

The case the grad norm alone misses: a TP-replicated parameter (a norm weight) is normed on TP
rank 0 only, so a NaN in TP rank 1's copy left the norm finite while TP rank 1 applied it.  A
NaN or inf loss on one rank is reported the same way, without deciding the skip.
"""

import math

import torch

from megamoe.parallel.params import param_meta
from tests.harness import run_distributed
from tests.tiny_moe import build, forward_backward


def _targets(model) -> dict[str, str]:
    """One parameter of each kind: TP-replicated dense, TP-sharded dense, expert."""
    out = {}
    for name, p in model.named_parameters():
        meta = param_meta(p)
        kind = "expert" if meta.is_expert else "tp-replicated" if meta.tensor_parallel_dim is None else "tp-sharded"
        out.setdefault(kind, name)
    return out


def _nan_on_each_rank_body(rank, world):
    seen = []
    for zero in (False, True):
        model, opt = build(2, (2, 2), zero=zero)
        params = dict(model.named_parameters())
        step = 0
        forward_backward(model, opt, step)
        assert not opt.step().skipped
        for kind, name in _targets(model).items():
            for bad_rank in range(world):
                step += 1
                forward_backward(model, opt, step)
                if rank == bad_rank:  # this rank's local, not yet reduced, gradient
                    params[name].main_grad.view(-1)[-1] = math.nan
                before = {n: p.detach().clone() for n, p in params.items()}
                result = opt.step()
                where = f"ZeRO={zero} NaN in {kind} {name} on rank {bad_rank}"
                assert result.skipped and result.nonfinite_grad_ranks, where
                # Without ZeRO-1 the NaN reaches every rank of its reduction group, the rank itself
                # included; with it, the owner of that element's shard.
                assert bad_rank in result.nonfinite_grad_ranks or zero, (where, result.nonfinite_grad_ranks)
                for n, p in params.items():
                    assert torch.equal(p, before[n]), f"{where}: {n} changed in a skipped step"
                seen.append((where, result.nonfinite_grad_ranks, result.num_skipped_total))
        step += 1
        loss = forward_backward(model, opt, step)
        result = opt.step(loss=torch.tensor(math.inf if rank == world - 1 else loss))
        assert not result.skipped and result.nonfinite_loss_ranks == (world - 1,), result
        seen.append(("loss", result.nonfinite_loss_ranks, result.num_skipped_total))
    return seen


def test_a_nan_gradient_on_any_rank_skips_the_step_on_every_rank_with_one_agreed_flag():
    seen = run_distributed(_nan_on_each_rank_body, 4)
    assert len(seen[0]) == 2 * (3 * 4 + 1)
    assert all(s == seen[0] for s in seen), "the ranks disagree on which ranks found a NaN"
