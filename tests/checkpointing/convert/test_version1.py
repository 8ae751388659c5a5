"""A version 1 checkpoint (one file per rank) converts to exactly the full state the same
training state has in version 2, every replica compared; and non-zero vocabulary padding, which
the conversion would drop, is refused."""

import os
import shutil

import pytest
import torch

from megamoe.checkpointing.convert.run import convert
from megamoe.checkpointing.format import CheckpointError
from tests.checkpointing.save_load import load_and_step
from tests.harness import run_distributed


def test_version_1_converts_to_the_full_state_of_version_2(trained, tmp_path):
    from_v1 = convert(trained.version1_root, str(tmp_path / "v1"), to="consolidated", progress=None)
    from_v2 = convert(trained.root, str(tmp_path / "v2"), to="consolidated", progress=None)
    assert from_v1.source_full.count == 17 * 4  # the weight, master and Adam moments of every parameter
    assert (from_v1.source_full.count, from_v1.source_full.digest) == (
        from_v2.source_full.count, from_v2.source_full.digest
    )
    assert from_v1.replicas_compared > 0  # DP copies of the weights, compared bitwise


def test_version_1_loads_and_continues_training_after_conversion(trained, tmp_path):
    root = str(tmp_path / "v2")
    convert(trained.version1_root, root, progress=None)
    out = run_distributed(load_and_step, trained.run.world, [(trained.run, root)], trained.steps, timeout=600)[0][0]
    for name, tensor in out["loaded_params"].items():
        assert torch.equal(tensor, trained.saved_params[name]), name
    assert out["loss"] == pytest.approx(trained.next_loss, rel=1e-6)


def test_non_zero_vocabulary_padding_is_refused(trained, tmp_path):
    root = str(tmp_path / "padded")
    shutil.copytree(trained.version1_root, root)
    # TP rank 1 of 2 holds rows 256..511 of the 512 padded rows; the vocabulary ends at 300.
    for rank in (1, 3):  # its two DP copies, which must stay equal
        path = os.path.join(root, f"iter_{trained.steps:07d}", f"rank_{rank:05d}.pt")
        payload = torch.load(path, weights_only=True)
        payload["model"]["word_embeddings.weight"][100, 3] = 1.0
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"the weight of word_embeddings.weight has non-zero values in its "
                                              r"vocabulary padding; they would be lost by the conversion"):
        convert(root, str(tmp_path / "out"), progress=None)
    assert not os.path.exists(tmp_path / "out")
