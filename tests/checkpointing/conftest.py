"""The trained checkpoint every conversion test starts from, made once per session.

Layout A: world 4, TP 2 (DP 2), EP 2 for MoE layer 0 and 1 for layer 1 (two EP sizes in one
model), ZeRO-1 on; two optimizer steps, then saved by ``megamoe.training.checkpoint`` (format
version 2) and, the same state, in format version 1 (``convert/version1.py``).  The session also
keeps what the model in A computed: logits of the saved weights, and the loss and parameters of
the step after the save (what a converted checkpoint must reproduce).
"""

from dataclasses import dataclass

import pytest
import torch

from tests.checkpointing.save_load import VOCAB, Run, train_save_continue
from tests.tiny_moe import SEQ
from tests.harness import run_distributed

LAYOUT_A = Run(world=4, tp=2, eps=(2, 1), zero=True)
STEPS = 2


@dataclass
class Trained:
    root: str  # the save root (holds latest_checkpointed_iteration.txt)
    version1_root: str  # the same state saved in format version 1
    run: Run
    steps: int
    tokens: torch.Tensor  # [2, SEQ]
    logits: torch.Tensor  # [2, SEQ, VOCAB] of the saved weights
    saved_params: dict  # full parameters as saved
    next_loss: float  # loss of step ``steps`` taken right after the save
    next_params: dict  # full parameters after it


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    root = str(tmp_path_factory.mktemp("trained") / "A")
    version1_root = root + "_v1"
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    out = run_distributed(train_save_continue, LAYOUT_A.world, LAYOUT_A, root, STEPS, tokens, version1_root,
                          timeout=600)[0]
    return Trained(
        root, version1_root, LAYOUT_A, STEPS, tokens, out["logits"], out["saved_params"], out["next_loss"],
        out["next_params"],
    )
