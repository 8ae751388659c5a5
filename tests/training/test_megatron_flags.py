"""A Megatron launch script's flags for things megamoe always does are accepted (their meaning
goes to the log), other values of them are one-line errors naming the flag and the valid
values, and none of them changes the config."""

import re

import pytest

from megamoe.training.arguments import parse_config
from megamoe.training.megatron_flags import MEGATRON_FLAGS
from tests.fixtures import TINY_MOE, assert_config_error

MEGATRON_MIXTRAL = [  # as in Megatron-LM's Mixtral example
    "--use-mcore-models", "--transformer-impl", "local", "--no-masked-softmax-fusion", "--no-position-embedding",
    "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall",
    "--overlap-param-gather", "--pipeline-model-parallel-size", "1", "--make-vocab-size-divisible-by", "128",
    "--use-flash-attn", "--attention-softmax-in-fp32", "--accumulate-allreduce-grads-in-fp32",
    "--distributed-backend", "nccl", "--num-workers", "2", "--log-throughput", "--rotary-percent", "1.0",
    "--no-gradient-accumulation-fusion", "--ckpt-format", "torch", "--optimizer", "adam", "--dataloader-type", "single",
]


def test_a_megatron_script_parses_to_the_same_config_and_says_what_each_flag_means():
    plain = parse_config(TINY_MOE, world_size=1)
    with_megatron = parse_config(TINY_MOE + MEGATRON_MIXTRAL, world_size=1)
    for part in ("model", "parallel", "optimizer", "schedule", "data", "train", "checkpoint", "logging"):
        assert getattr(with_megatron, part) == getattr(plain, part), part
    given = {a for a in MEGATRON_MIXTRAL if a.startswith("--")}
    assert {n.split(":")[0].split(" ")[0] for n in with_megatron.notices} == given
    assert all("accepted for Megatron compatibility" in n for n in with_megatron.notices)
    assert plain.notices == []


@pytest.mark.parametrize("extra,message", [
    (["--pipeline-model-parallel-size", "2"], "--pipeline-model-parallel-size 2: megamoe supports only 1 "
                                              "(megamoe has no pipeline parallelism)"),
    (["--moe-token-dispatcher-type", "allgather"], "--moe-token-dispatcher-type allgather: megamoe supports only "
                                                   "alltoall"),
    (["--moe-router-load-balancing-type", "sinkhorn"], "--moe-router-load-balancing-type 'sinkhorn': valid values "
                                                       "are ['aux_loss', 'seq_aux_loss', 'global_aux_loss', 'none']"),
    (["--optimizer", "sgd"], "--optimizer sgd: megamoe supports only adam"),
    (["--make-vocab-size-divisible-by", "64"], "--make-vocab-size-divisible-by 64: megamoe supports only 128"),
    (["--tokenizer-type", "HuggingFaceTokenizer"], "--tokenizer-type HuggingFaceTokenizer: megamoe supports only "
                                                   "SentencePieceTokenizer"),
    (["--moe-router-load-balancing-type", "none"], "--moe-router-load-balancing-type none contradicts "
                                                   "--moe-aux-loss-coeff 0.01"),
    (["--no-position-embedding", "--position-embedding-type", "learned_absolute"],
     "--no-position-embedding contradicts --position-embedding-type learned_absolute"),
])
def test_a_value_megamoe_does_not_do_is_refused_naming_the_valid_ones(extra, message):
    assert_config_error(TINY_MOE + extra, 1, re.escape(message))


def test_every_megatron_flag_is_in_help_and_none_shadows_a_megamoe_flag():
    from megamoe.flags import flag_fields
    from megamoe.training.arguments import build_parser
    from megamoe.training.config import FLAG_GROUPS

    own = flag_fields([cls for _, cls in FLAG_GROUPS])
    text = build_parser().format_help()
    for f in MEGATRON_FLAGS:
        assert f.name not in own, f.name
        assert f.name in text, f.name


def test_load_balancing_type_none_is_a_zero_aux_loss_coefficient():
    argv = [a for a in TINY_MOE]
    argv[argv.index("--moe-aux-loss-coeff") + 1] = "0"
    cfg = parse_config(argv + ["--moe-router-load-balancing-type", "none"], world_size=1)
    assert cfg.model.moe_aux_loss_coeff == 0.0 and cfg.model.moe_router_load_balancing_type == "none"
