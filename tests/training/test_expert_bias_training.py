"""pretrain_moe.py with grouped-query attention, QK-norm and sigmoid routing with an expert bias:
the bias moves during training, is saved with the checkpoint and restored on resume (the resumed
run, with activation recomputation, equals the straight one bitwise), and another layout logs the
same losses."""

import torch

from megamoe.checkpointing.format import read_metadata
from megamoe.checkpointing.convert.sharded_reader import ShardedReader
from tests.fixtures import TINY_MOE, read_json_log, run_main
from tests.harness import run_distributed

ARCH = ["--group-query-attention", "--num-query-groups", "2", "--qk-layernorm", "--moe-router-score-function",
        "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.01", "--train-iters", "4"]


def _model_state(save_dir):
    """Iteration and full model tensors (parameters and persistent buffers) of the latest checkpoint."""
    directory, metadata = read_metadata(save_dir)
    reader = ShardedReader(directory, metadata)
    state = {name: s["param"] for name, s in reader.read(list(reader.info.specs)).items()}
    state.update(reader.info.buffers)
    return metadata["iteration"], state


def test_expert_bias_trains_saves_and_resumes_exactly(tmp_path):
    common = TINY_MOE + ARCH + ["--lr-decay-iters", "4"]
    ep2 = ["--expert-model-parallel-size", "2"]
    straight = common + ep2 + ["--save", str(tmp_path / "straight"), "--log-json", str(tmp_path / "straight.jsonl")]
    first_half = common + ep2 + ["--save", str(tmp_path / "halves"), "--log-json", str(tmp_path / "halves.jsonl")]
    first_half[first_half.index("--train-iters") + 1] = "2"
    second_half = common + ep2 + ["--load", str(tmp_path / "halves"), "--save", str(tmp_path / "halves"),
                                  "--log-json", str(tmp_path / "halves.jsonl"), "--recompute-granularity", "full"]
    tp2 = common + ["--tensor-model-parallel-size", "2", "--log-json", str(tmp_path / "tp2.jsonl")]
    run_distributed(run_main, 2, [straight, first_half, second_half, tp2], timeout=600)
    a, b, c = (read_json_log(tmp_path / f"{n}.jsonl") for n in ("straight", "halves", "tp2"))
    assert [r["iteration"] for r in b] == [1, 2, 3, 4]
    for ra, rb, rc in zip(a, b, c, strict=True):
        assert ra["lm_loss"] == rb["lm_loss"] and ra["grad_norm"] == rb["grad_norm"], (ra, rb)
        for key in ("lm_loss", "grad_norm"):
            torch.testing.assert_close(rc[key], ra[key], rtol=1e-5, atol=0)
    (it_a, state_a), (it_b, state_b) = _model_state(tmp_path / "straight"), _model_state(tmp_path / "halves")
    assert it_a == it_b == 4 and state_a.keys() == state_b.keys()
    biases = [name for name in state_a if name.endswith("router.expert_bias")]
    assert len(biases) == 2 and all(state_a[name].abs().sum() > 0 for name in biases)
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
