"""Evaluation end to end: --eval-interval logs the validation loss of the global batch, the same
in every layout (averaged over DP, not one rank's share), and --skip-train evaluates a
checkpoint without training (Megatron's flag)."""

import pytest

from tests.fixtures import TINY_MOE, read_json_log, run_main
from tests.harness import run_distributed

BASE = TINY_MOE + ["--train-iters", "4", "--eval-interval", "2", "--eval-iters", "2"]
LAYOUTS = {  # world 2: DP 1 and DP 2
    "tp2": ["--tensor-model-parallel-size", "2"],
    "dp2-ep2": ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"],
}


def _evals(path) -> list[dict]:
    return [r for r in read_json_log(path) if r.get("split") == "valid"]


def test_evaluation_is_the_global_batch_mean_in_every_layout_and_skip_train_repeats_it(tmp_path):
    runs = [BASE + ["--log-json", str(tmp_path / f"{name}.jsonl"), "--save", str(tmp_path / name),
                    "--save-interval", "2", *flags] for name, flags in LAYOUTS.items()]
    # --skip-train on the DP 2 run's checkpoint of iteration 2: that evaluation again, nothing trained
    skip = TINY_MOE + ["--eval-iters", "2", "--skip-train", "--load", str(tmp_path / "dp2-ep2" / "iter_0000002"),
                       "--log-json", str(tmp_path / "skip.jsonl"), *LAYOUTS["dp2-ep2"]]
    run_distributed(run_main, 2, runs + [skip], timeout=600)
    evals = {name: _evals(tmp_path / f"{name}.jsonl") for name in LAYOUTS}
    assert [r["iteration"] for r in evals["tp2"]] == [2, 4]
    for want, got in zip(evals["tp2"], evals["dp2-ep2"], strict=True):
        assert got["lm_loss"] == pytest.approx(want["lm_loss"], rel=1e-5), (want, got)
    # the two evaluations read different batches of a model that trained in between
    assert evals["tp2"][0]["lm_loss"] != evals["tp2"][1]["lm_loss"]

    (record,) = read_json_log(tmp_path / "skip.jsonl")
    assert record == evals["dp2-ep2"][0]
