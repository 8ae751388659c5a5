"""--sequence-parallel and --expert-tensor-parallel-size: bad combinations are one-line ConfigErrors
from parse_config naming the flags and the valid values, before anything is built; good ones
reach the parallel config."""

import pytest

from megamoe.training.arguments import parse_config
from tests.fixtures import assert_config_error

BASE = ["--device", "cpu", "--mock-data", "--vocab-size", "64", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "16", "--num-experts", "4", "--moe-ffn-hidden-size", "24"]


@pytest.mark.parametrize("extra,message", [
    (["--tensor-model-parallel-size", "2", "--expert-tensor-parallel-size", "1"],
     "--expert-tensor-parallel-size 1 differs from --tensor-model-parallel-size 2: that needs --sequence-parallel"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "3"],
     r"--expert-tensor-parallel-size 3 does not divide the world size 8; valid values: \[1, 2, 4, 8\]"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "0"],
     r"--expert-tensor-parallel-size 0 does not divide the world size 8; valid values: \[1, 2, 4, 8\]"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "1",
      "--num-experts", "16", "--expert-model-parallel-size", "16"],
     r"--expert-model-parallel-size 16 x --expert-tensor-parallel-size 1 does not divide the world size 8; "
     r"valid --expert-model-parallel-size values: \[1, 2, 4, 8\]"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "8",
      "--moe-ffn-hidden-size", "20"],
     r"--moe-ffn-hidden-size 20 is not divisible by --expert-tensor-parallel-size 8"),
    (["--tensor-model-parallel-size", "4", "--sequence-parallel", "--seq-length", "18"],
     "--sequence-parallel needs --seq-length 18 divisible by --tensor-model-parallel-size 4"),
])
def test_bad_parallel_flags_are_one_line_errors(extra, message):
    assert_config_error(BASE + extra, 8, message)


def test_folded_expert_parallelism_reaches_the_parallel_config():
    cfg = parse_config(BASE + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                               "--expert-tensor-parallel-size", "1", "--expert-model-parallel-size", "4"], world_size=4)
    assert cfg.parallel.sequence_parallel and cfg.parallel.expert_tensor_parallel_size == 1
    assert cfg.parallel.expert_model_parallel_size == (4,)
