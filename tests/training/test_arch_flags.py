"""Flags of the routing rules, grouped-query attention and QK-norm: every combination that
cannot work is a one-line ConfigError from parse_config, before anything is built."""

import pytest

from megamoe.training.arguments import parse_config
from tests.fixtures import assert_config_error

BASE = ["--device", "cpu", "--mock-data", "--vocab-size", "64", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "16", "--num-experts", "8", "--moe-router-topk", "4"]


@pytest.mark.parametrize("extra,message", [
    (["--moe-router-score-function", "sigmoid", "--moe-router-pre-softmax"],
     "--moe-router-pre-softmax applies to softmax scores, not --moe-router-score-function sigmoid"),
    (["--moe-router-enable-expert-bias"], "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid"),
    (["--moe-router-bias-update-rate", "0.01"], "--moe-router-bias-update-rate needs --moe-router-enable-expert-bias"),
    (["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0"],
     "--moe-router-bias-update-rate must be > 0"),
    (["--moe-router-topk-scaling-factor", "-1"], "--moe-router-topk-scaling-factor must be > 0"),
    (["--moe-router-num-groups", "3", "--moe-router-group-topk", "1"], "--moe-router-num-groups 3 does not divide --num-experts 8"),
    (["--moe-router-num-groups", "4", "--moe-router-group-topk", "5"], r"--moe-router-group-topk 5 must be in \[1, min"),
    (["--moe-router-num-groups", "4"], "--moe-router-num-groups and --moe-router-group-topk go together"),
    (["--moe-router-num-groups", "8", "--moe-router-group-topk", "2"], "hold fewer than --moe-router-topk 4 experts"),
])
def test_bad_routing_flags_are_one_line_errors(extra, message):
    assert_config_error(BASE + extra, 1, message)


@pytest.mark.parametrize("extra,message", [
    (["--group-query-attention", "--num-query-groups", "3"], "--num-query-groups 3 must divide --num-attention-heads 4"),
    (["--num-query-groups", "2"], "--num-query-groups needs --group-query-attention"),
    (["--group-query-attention", "--num-query-groups", "2", "--tensor-model-parallel-size", "4"],
     "--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"),
    (["--kv-channels", "7"], "rope needs an even head dim"),
])
def test_bad_attention_flags_are_one_line_errors(extra, message):
    assert_config_error(BASE + extra, 4, message)


def test_good_routing_flags_reach_the_model_config():
    cfg = parse_config(BASE + ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                               "--moe-router-bias-update-rate", "0.01", "--moe-router-topk-scaling-factor", "2.5",
                               "--moe-router-num-groups", "4", "--moe-router-group-topk", "2"], world_size=1)
    m = cfg.model
    assert (m.moe_router_score_function, m.moe_router_enable_expert_bias, m.expert_bias_update_rate) == ("sigmoid", True, 0.01)
    assert (m.moe_router_topk_scaling_factor, m.moe_router_num_groups, m.moe_router_group_topk) == (2.5, 4, 2)
    gqa = parse_config(BASE + ["--group-query-attention", "--num-query-groups", "2", "--qk-layernorm",
                               "--kv-channels", "16"], world_size=1).model
    assert (gqa.num_kv_heads, gqa.qk_layernorm, gqa.head_dim) == (2, True, 16)
    assert parse_config(BASE + ["--group-query-attention"], world_size=1).model.num_kv_heads == 1  # Megatron's default
