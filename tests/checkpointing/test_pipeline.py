"""Checkpoints across pipeline layouts: a checkpoint saved at any PP loads at any other PP, TP, EP,
DP and ZeRO-1, optimizer state included, and the conversion tool and Hugging Face export and
import read and write pipeline layouts.

The model: the tiny MoE with 4 layers and tied embeddings, so the last stage holds a copy of the
input embedding.  Trained 2 steps at PP 1 x EP 2 (ZeRO-1) on 4 ranks and saved; loaded at
PP 2 x EP 2 (ZeRO-1) and saved again; that checkpoint loaded at PP 1 x EP 4 and at PP 4, each
saved again.  Every save holds the same full state, bit for bit, and every rank of every layout
holds the boxes of it that its stage owns."""

import json
import os

import pytest
import torch

from megamoe.checkpointing.boxes import Box
from megamoe.checkpointing.convert.run import convert
from megamoe.checkpointing.format import SavedTopology, ShardFiles, read_metadata
from tests.checkpointing.save_load import VOCAB, Run, continue_elsewhere, train_then_reshard
from tests.fixtures import TINY_MOE, read_json_log, run_main
from tests.harness import run_distributed
from tests.tiny_moe import tiny_config

CONFIG = tiny_config(num_layers=4, vocab_size=VOCAB)
FIRST = Run(world=4, tp=1, eps=(2,), zero=True)
PP2_EP2 = Run(world=4, tp=1, eps=(2,), zero=True, pp=2)
PP1_EP4 = Run(world=4, tp=1, eps=(4,), zero=False)
PP4 = Run(world=4, tp=1, eps=(1,), zero=True, pp=4)
CHAIN = [(PP2_EP2, 0), (PP1_EP4, 1), (PP4, 1)]  # (layout, the save it loads)
STEPS = 2


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    roots = [str(base / name) for name in ("pp1_ep2", "pp2_ep2", "pp1_ep4", "pp4")]
    views = run_distributed(train_then_reshard, 4, CONFIG, FIRST, STEPS, CHAIN, roots, timeout=600)
    return roots, views


def full_tensors(root: str) -> dict[str, torch.Tensor]:
    """Every global tensor of a checkpoint (``model/...``, ``optim/KIND/...``), assembled from its chunks."""
    directory, metadata = read_metadata(root)
    files = ShardFiles(directory, metadata)
    out = {}
    for key, entry in files.tensors.items():
        shape = tuple(entry["shape"])
        out[key] = torch.empty(shape, dtype=getattr(torch, entry["dtype"]))
        files.read_into(key, Box((0,) * len(shape), shape), out[key])
    return out


def _metadata(root: str) -> dict:
    return read_metadata(root)[1]


def assert_same_state(got: dict, want: dict, where: str) -> None:
    assert got.keys() == want.keys(), where
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), f"{where}: {key} differs"


def test_every_layout_saves_the_same_state_bitwise(resharded):
    roots, _ = resharded
    want, want_meta = full_tensors(roots[0]), _metadata(roots[0])
    assert any(key.startswith("optim/exp_avg/") for key in want)
    for root, (run, _) in zip(roots[1:], CHAIN):
        meta = _metadata(root)
        assert SavedTopology.from_metadata(meta["layout"]).pp == run.pp, root
        assert meta["params"] == want_meta["params"] and meta["optimizer"] == want_meta["optimizer"], root
        assert meta["iteration"] == STEPS
        assert_same_state(full_tensors(root), want, f"saved at {run}")


def test_every_rank_holds_its_stage_of_the_loaded_state(resharded):
    roots, views = resharded
    want = full_tensors(roots[0])
    for i, (run, _) in enumerate(CHAIN):
        keys = set()
        for rank, per_load in enumerate(views):
            for key, offsets, sizes, tensor in per_load[i]:
                index = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
                assert torch.equal(tensor, want[key][index]), f"{run} rank {rank}: {key} {offsets} not loaded"
                keys.add(key)
        assert keys == set(want), f"{run}: no rank holds {sorted(set(want) - keys)[:3]}"
        if run.pp > 1:
            # Tied embeddings: the last stage's copy, and its optimizer state, loaded too.
            last = views[run.world - 1][i]
            assert {"model/word_embeddings.weight", "optim/master/word_embeddings.weight"} <= {v[0] for v in last}


def test_the_tied_embedding_is_written_once(resharded):
    roots, _ = resharded
    for root in (roots[1], roots[3]):
        meta = _metadata(root)
        # Both stages hold the weight: one chunk.  Its ZeRO-1 optimizer state is sharded over
        # both stages' DP ranks: their chunks tile it once (the save checks the cover).
        assert len(meta["tensors"]["model/word_embeddings.weight"]["chunks"]) == 1, root
        layers = {key.split(".")[1] for key in meta["tensors"] if key.startswith("model/layers.")}
        assert layers == {"0", "1", "2", "3"}


def test_conversion_reads_and_writes_pipeline_layouts(resharded, tmp_path):
    roots, _ = resharded
    want = full_tensors(roots[0])
    to_pp1, back_to_pp2 = str(tmp_path / "pp1"), str(tmp_path / "pp2")
    summary = convert(roots[1], to_pp1, target_pipeline_model_parallel_size=1, target_expert_parallel_size=(4,),
                      progress=None)
    assert "PP 2" in summary.source and "PP" not in summary.target.split("(", 1)[1]
    convert(to_pp1, back_to_pp2, target_pipeline_model_parallel_size=2, target_expert_parallel_size=(2,),
            progress=None)
    for root in (to_pp1, back_to_pp2):
        assert_same_state(full_tensors(root), want, root)
    meta = _metadata(back_to_pp2)
    assert meta["layout"]["pipeline_model_parallel_size"] == 2 and len(meta["rng"]) == 4
    with pytest.raises(ValueError, match="--target-pipeline-model-parallel-size 3 does not divide"):
        convert(roots[1], str(tmp_path / "bad"), target_pipeline_model_parallel_size=3, progress=None)


def test_hugging_face_export_and_import_at_pp2(resharded, tmp_path):
    roots, _ = resharded
    hf, back = str(tmp_path / "hf"), str(tmp_path / "back")
    convert(roots[1], hf, to="hf", progress=None)
    assert json.load(open(os.path.join(hf, "config.json")))["num_hidden_layers"] == 4
    convert(hf, back, from_format="hf", target_pipeline_model_parallel_size=2, target_world_size=4,
            target_expert_parallel_size=(2,), progress=None)
    assert _metadata(back)["layout"]["pipeline_model_parallel_size"] == 2
    weights = {key: t for key, t in full_tensors(roots[1]).items() if key.startswith("model/")}
    assert_same_state(full_tensors(back), weights, "imported")


# With MTP the last stage also holds a copy of the input embedding, untied embeddings too.
MTP = tiny_config(num_layers=4, vocab_size=VOCAB, mtp_num_layers=1, untie_embeddings_and_output_weights=True)


@pytest.mark.parametrize("config,loads", [(CONFIG, [PP1_EP4, PP4]), (MTP, [PP1_EP4])], ids=["tied", "mtp"])
def test_saved_at_pp2_ep2_training_continues_at_pp1_ep4_and_pp4(tmp_path, config, loads):
    root = str(tmp_path / "pp2_ep2")
    reference, *loaded = run_distributed(continue_elsewhere, 4, config, PP2_EP2, STEPS, 2, root, loads,
                                         timeout=600)[0]
    keys = ("lm_loss", "aux_loss", "z_loss", "grad_norm") + (("mtp_loss",) if config.mtp_num_layers else ())
    for run, got in zip(loads, loaded):
        for key in keys:
            assert got[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-9), (run, key)


def test_pretrain_resumes_a_pp2_checkpoint_at_pp1(tmp_path):
    """The same through pretrain_moe.py: a PP 2 x EP 2 (ZeRO-1) run saved at iteration 2 and
    resumed with --load at PP 1 x EP 4 logs the losses of the run that went on at PP 2."""
    common = TINY_MOE + ["--use-distributed-optimizer", "--train-iters", "4", "--lr-decay-iters", "4"]
    pp2 = ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"]
    straight = common + pp2 + ["--log-json", str(tmp_path / "straight.jsonl")]
    first = common + pp2 + ["--save", str(tmp_path / "ckpt"), "--exit-interval", "2"]
    resumed = common + ["--expert-model-parallel-size", "4", "--load", str(tmp_path / "ckpt"),
                        "--log-json", str(tmp_path / "resumed.jsonl")]
    run_distributed(run_main, 4, [straight, first, resumed], timeout=600)
    want = read_json_log(tmp_path / "straight.jsonl")[2:]
    got = read_json_log(tmp_path / "resumed.jsonl")
    assert [r["iteration"] for r in got] == [3, 4] == [r["iteration"] for r in want]
    for w, g in zip(want, got):
        for key in ("lm_loss", "aux_loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-6), (g["iteration"], key)


def test_saved_ranks_and_rng_sources_follow_the_pipeline_rank_formula():
    """global rank = pp_rank x world / PP + dp_rank x TP + tp_rank, and a rank of another layout
    continues from the saved RNG states at its (PP, DP, TP) coordinates, rank 0's of a PP or DP
    dimension the saved layout did not have."""
    from megamoe.checkpointing.rng_map import rng_source

    top = SavedTopology(world_size=8, tensor_model_parallel_size=2, expert_model_parallel_size=(2,),
                        use_distributed_optimizer=True, expert_tensor_parallel_size=2, pipeline_model_parallel_size=2)
    assert (top.stage_size, top.dp) == (4, 2)
    assert [top.coordinates(r) for r in range(8)] == [(p, d, t) for p in range(2) for d in range(2) for t in range(2)]
    assert all(top.rank(pp_rank=p, dp_rank=d, tp_rank=t) == p * 4 + d * 2 + t
               for p in range(2) for d in range(2) for t in range(2))
    assert SavedTopology.from_metadata(top.to_metadata()) == top
    saved = dict(saved_pp=2, saved_dp=2, saved_tp=2)
    assert rng_source(**saved, pp_rank=1, dp_rank=1, tp_rank=1) == (1, 1, 1, False)
    assert rng_source(**saved, pp_rank=3, dp_rank=2, tp_rank=0) == (0, 0, 0, False)
    assert rng_source(**saved, pp_rank=1, dp_rank=0, tp_rank=2) == (0, 0, 0, True)
