"""Integer-list flags take space- and comma-separated values alike, in pretrain_moe.py and in
tools/convert_checkpoint.py, through the one parser (megamoe.int_list)."""

import importlib.util
import os

import pytest

from megamoe.int_list import parse_int_list
from megamoe.training.arguments import ConfigError, parse_config
from tests.fixtures import REPO

PYRAMID = ["--device", "cpu", "--mock-data", "--vocab-size", "64", "--num-layers", "2", "--hidden-size", "32",
           "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "1", "--train-iters", "1"]


def _tool_parser():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(REPO, "tools", "convert_checkpoint.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


@pytest.mark.parametrize("tokens", [["4", "8"], ["4,8"], ["[4,8]"], ["4", "[8]"], "4,8"])
def test_spaces_commas_and_brackets_give_the_same_list(tokens):
    assert parse_int_list(tokens) == [4, 8]


def test_bad_values_are_refused_with_the_text():
    with pytest.raises(ValueError, match="expected integers separated by spaces or commas, got '4 x'"):
        parse_int_list(["4", "x"])
    with pytest.raises(ValueError, match="must be >= 1, got '4,0'"):
        parse_int_list("4,0", minimum=1)


@pytest.mark.parametrize("experts, eps", [(["4", "8"], ["4", "2"]), (["4,8"], ["4,2"]), (["4", "8"], ["4,2"])])
def test_pretrain_takes_per_layer_experts_and_ep_sizes_space_or_comma_separated(experts, eps):
    cfg = parse_config(PYRAMID + ["--num-experts", *experts, "--expert-model-parallel-size", *eps], world_size=8)
    assert cfg.model.num_experts == (4, 8)
    assert cfg.parallel.expert_model_parallel_size == (4, 2)


def test_pretrain_refuses_a_bad_list_naming_the_flag():
    with pytest.raises(ConfigError, match="argument --num-experts: expected integers"):
        parse_config(PYRAMID + ["--num-experts", "4", "eight"], world_size=1)


@pytest.mark.parametrize("tokens", [["4", "2"], ["4,2"]])
def test_convert_checkpoint_takes_target_ep_sizes_space_or_comma_separated(tokens):
    args = _tool_parser().parse_args(["--load-dir", "a", "--save-dir", "b", "--target-expert-parallel-size", *tokens])
    assert args.target_expert_parallel_size == [4, 2]


def test_convert_checkpoint_refuses_an_ep_size_below_one(capsys):
    with pytest.raises(SystemExit):
        _tool_parser().parse_args(["--load-dir", "a", "--save-dir", "b", "--target-expert-parallel-size", "4", "0"])
    assert "argument --target-expert-parallel-size: values must be >= 1" in capsys.readouterr().err
