"""One MoE-layer parity case: the layer at this rank's layout against the plain-torch fp64 MoE
(``reference.py``) on every data-parallel rank's micro-batch (see ``test_layer_parity.py``); the
GPT parity tests run some of the same cases."""

from __future__ import annotations

import dataclasses

import torch

from megamoe.model.config import ModelConfig
from megamoe.model.moe.layer import MoELayer
from megamoe.parallel.gather import gather_full_state
from megamoe.parallel.params import initialize_module_, retag
from tests.model.moe.helpers import assert_matches, reduced_full_grads
from tests.model.moe.reference import reference_moe
from tests.tiny_moe import tiny_config
from tests.harness import current_layout

SEED = 1234
BATCH, SEQ, HIDDEN, EXPERTS = 2, 8, 32, 4


@dataclasses.dataclass
class Case:
    ep: int
    overrides: dict = dataclasses.field(default_factory=dict)
    train: bool = True
    uneven: bool = False  # router forced to send every token to experts 0 (and 1 when top-2)
    expect_drops: bool = False


def layer_config(case: Case) -> ModelConfig:
    """The case's architecture (``moe_grouped_gemm`` in its overrides is an execution choice: ``layer_of``)."""
    overrides = {k: v for k, v in case.overrides.items() if k != "moe_grouped_gemm"}
    return tiny_config(**{**dict(
        vocab_size=64, hidden_size=HIDDEN, moe_ffn_hidden_size=16, num_experts=EXPERTS, moe_aux_loss_coeff=0.1,
        moe_z_loss_coeff=0.01,
    ), **overrides})


def layer_of(case: Case, state) -> MoELayer:
    """Layer 0 of the case's model in ``state``'s groups, at EP ``case.ep``."""
    layout = dataclasses.replace(state, ep_by_layer={0: case.ep})
    return MoELayer(layer_config(case), 0, layout, grouped_gemm=case.overrides.get("moe_grouped_gemm", True))


def micro_batch(d: int, uneven: bool):
    """Layer input and upstream gradient of DP rank ``d`` (every rank can draw every rank's)."""
    gen = torch.Generator().manual_seed(100 + d)
    x = torch.randn(BATCH, SEQ, HIDDEN, generator=gen)
    if uneven:
        x = 0.1 * x + 1.0  # every token points along the all-ones direction
    return x, torch.randn(BATCH, SEQ, HIDDEN, generator=gen)


def _force_uneven_routing(layer: MoELayer) -> None:
    """Logits ~ sum(x) * (1, 0.5, -0.5, -1): expert 0 wins every token, expert 1 is second."""
    preference = torch.tensor([1.0, 0.5, -0.5, -1.0]).unsqueeze(-1)
    with torch.no_grad():
        layer.router.weight.copy_(preference * torch.ones(EXPERTS, HIDDEN))


def check_layer_case(case: Case) -> None:
    state = current_layout()
    dp, dp_rank, tokens = state.dp_size, state.dp_rank, BATCH * SEQ
    cfg = layer_config(case)
    layer = layer_of(case, state)
    for name, param in layer.named_parameters():
        if "bias" in name:  # drawn like a weight (layout-independently), so that a mistake shows
            retag(param, init="normal", init_std=0.1)
    initialize_module_(layer, SEED, state)
    if case.uneven:
        _force_uneven_routing(layer)
    layer.train(case.train)
    factor = layer._active_capacity_factor()

    x, grad_out = micro_batch(dp_rank, case.uneven)
    x.requires_grad_()
    out, aux = layer(x)
    ((out * grad_out).sum() + aux.loss).backward()
    grads = reduced_full_grads(layer)

    weights = {name: full.double().requires_grad_() for name, full in gather_full_state(layer, layer.layout).items()}
    total, mine, x_ref = 0.0, None, None
    for d in range(dp):
        xd, gd = micro_batch(d, case.uneven)
        xd = xd.double().view(tokens, HIDDEN).requires_grad_()
        ref = reference_moe(xd, weights, cfg=cfg, num_experts=EXPERTS, capacity_factor=factor)
        loss_d = (ref.out * gd.double().view(tokens, HIDDEN)).sum()
        loss_d = loss_d + cfg.moe_aux_loss_coeff * ref.load_balancing + cfg.moe_z_loss_coeff * ref.z
        total = total + loss_d / dp
        if d == dp_rank:
            mine, x_ref = ref, xd
    total.backward()

    label = f"{case} tp={state.tp_size}"
    assert_matches(out.view(tokens, HIDDEN), mine.out, f"output {label}")
    assert_matches(aux.stats.aux_loss, mine.load_balancing, f"load-balancing loss {label}")
    assert_matches(aux.stats.z_loss, mine.z, f"z loss {label}")
    assert torch.equal(aux.stats.tokens_per_expert, mine.tokens_per_expert), label
    dropped = aux.stats.dropped_fraction.item() * tokens * cfg.moe_router_topk
    assert round(dropped) == mine.dropped, (label, dropped, mine.dropped)
    if case.expect_drops:
        assert mine.dropped > 0, f"{label}: the capacity case must drop slots to test anything"
    # The tested x.grad is of this rank's own loss; the reference's is of the mean over DP.
    assert_matches(x.grad.view(tokens, HIDDEN), x_ref.grad * dp, f"input grad {label}")
    for name, want in weights.items():
        assert_matches(grads[name], want.grad, f"grad {name} {label}")
        if not case.uneven:
            assert want.grad.abs().sum() > 0, f"{name} got no gradient in {label}"
    if case.uneven:
        counts = mine.tokens_per_expert.tolist()
        assert counts[0] == tokens and counts[2] == counts[3] == 0, counts
        assert weights["experts.fc1"].grad[2:].abs().sum() == 0  # empty experts: zero gradient
