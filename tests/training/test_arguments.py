"""The flags are derived from the config dataclasses: every field has a flag or is marked derived,
--help shows every default and the choices, the dataclass defaults are the command line's, and
each mistake is one ConfigError naming the flag (checked in this process, no spawn)."""

import dataclasses
import io
import re
from contextlib import redirect_stdout

import pytest

from megamoe.flags import flag_fields, flag_of, flag_name, is_derived
from megamoe.model.config import ModelConfig
from megamoe.optim import OptimizerConfig
from megamoe.training.arguments import build_parser, parse_config
from megamoe.training.config import FLAG_GROUPS
from megamoe.training.megatron_flags import MEGATRON_FLAGS
from tests.fixtures import TINY_MOE, assert_config_error

MOCK = ["--device", "cpu", "--mock-data", "--vocab-size", "200", "--train-iters", "2"]


def _help() -> str:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--help"])
    assert exit_.value.code == 0
    return " ".join(out.getvalue().split())  # argparse wraps lines


def test_every_config_field_is_a_flag_or_marked_derived():
    for _, cls in FLAG_GROUPS:
        for f in dataclasses.fields(cls):
            assert (flag_of(f) is not None) != is_derived(f), f"{cls.__name__}.{f.name}"
    flags = flag_fields([cls for _, cls in FLAG_GROUPS])
    parser_flags = {o for a in build_parser()._actions for o in a.option_strings} - {"-h", "--help"}
    assert parser_flags == set(flags) | {f.name for f in MEGATRON_FLAGS}


def test_a_plain_field_cannot_be_added():
    from megamoe.flags import add_flags

    @dataclasses.dataclass
    class Forgotten:
        size: int = 3

    with pytest.raises(TypeError, match="Forgotten.size is neither flag"):
        add_flags(build_parser(), Forgotten, "x")


def test_help_shows_each_default_and_the_choices():
    text = _help()
    for _, cls in FLAG_GROUPS:
        for f in dataclasses.fields(cls):
            if flag_of(f) is not None:
                assert flag_name(f) in text
    assert text.count("(default:") == len(flag_fields([cls for _, cls in FLAG_GROUPS]))
    for choices in ("{RMSNorm,LayerNorm}", "{rope,learned_absolute}", "{constant,linear,cosine,wsd}",
                    "{probs,position}", "{cpu,cuda}", "{online,offline,disabled}", "{full,selective}", "{uniform,block}"):
        assert choices in text, choices
    assert "--num-layers NUM_LAYERS transformer layers (default: 4)" in text
    assert "--lr LR peak learning rate (the schedule sets the step's lr) (default: 0.0003)" in text


def test_dataclass_defaults_are_the_command_line_model():
    cfg = parse_config(MOCK, world_size=1)
    assert cfg.model == ModelConfig(vocab_size=200, max_position_embeddings=128)
    assert cfg.optimizer == OptimizerConfig()
    assert not cfg.model.swiglu and cfg.model.add_bias_linear
    assert cfg.execution.moe_grouped_gemm
    negated = parse_config(MOCK + ["--disable-bias-linear", "--no-moe-grouped-gemm"], world_size=1)
    assert not negated.model.add_bias_linear and not negated.execution.moe_grouped_gemm


def test_derived_values():
    cfg = parse_config(MOCK + ["--num-experts", "4", "--expert-model-parallel-size", "2", "--micro-batch-size", "2",
                               "--global-batch-size", "16", "--tensor-model-parallel-size", "2", "--bf16",
                               "--lr", "1e-3", "--min-lr", "1e-4", "--seq-length", "32"], world_size=8)
    assert cfg.parallel.data_parallel_size == 4 and cfg.train.num_microbatches == 2
    assert cfg.execution.params_dtype == cfg.optimizer.params_dtype == cfg.train.params_dtype
    assert (cfg.schedule.lr, cfg.schedule.min_lr, cfg.schedule.decay_iters) == (1e-3, 1e-4, 2)
    assert cfg.model.max_position_embeddings == 32 and cfg.parallel.expert_model_parallel_size == (2,)
    assert cfg.logging.peak_tflops is None  # no peak on CPU


@pytest.mark.parametrize(
    "extra,world,message",
    [
        (["--normalization", "BatchNorm"], 1, "--normalization 'BatchNorm': valid values are ['RMSNorm', 'LayerNorm']"),
        (["--moe-token-drop-policy", "random"], 1, "--moe-token-drop-policy 'random'"),
        (["--device", "tpu"], 1, "--device 'tpu': valid values are ['cpu', 'cuda']"),
        (["--num-layers", "0"], 1, "--num-layers must be > 0, got 0"),
        (["--weight-decay", "-1"], 1, "--weight-decay must be >= 0, got -1.0"),
        (["--clip-grad", "-1"], 1, "--clip-grad must be >= 0, got -1.0"),
        (["--min-lr", "1", "--lr", "0.1"], 1, "--min-lr 1.0 is larger than --lr 0.1"),
        (["--seq-length", "64", "--max-position-embeddings", "32"], 1, "--seq-length 64 exceeds --max-position-embeddings 32"),
        (["--num-experts", "4", "--expert-model-parallel-size", "4"], 2, "--expert-model-parallel-size 4 does not divide the data-parallel size 2"),
        (["--ffn-hidden-size", "50", "--tensor-model-parallel-size", "4"], 4, "--ffn-hidden-size 50 is not divisible by --tensor-model-parallel-size 4"),
        (["--expert-model-parallel-size", "2"], 2, "--expert-model-parallel-size needs --num-experts"),
        (["--save-interval", "5"], 1, "--save-interval needs --save DIR"),
        (["--finetune"], 1, "--finetune needs --load DIR"),
        (["--use-checkpoint-args"], 1, "--use-checkpoint-args needs --load DIR"),
    ],
)
def test_a_mistake_is_one_config_error_naming_the_flag(extra, world, message):
    assert_config_error(MOCK + extra, world, re.escape(message))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--num-layers", "four"], "argument --num-layers: invalid int value: 'four'"),
        (["--no-such-flag"], "unrecognized argument: --no-such-flag; see --help"),
        (["--moe-layer-freq", "1,x"], "argument --moe-layer-freq: '1,x': give an integer N or a 0/1 pattern"),
        # No abbreviations (Megatron's allow_abbrev=False): a typo is refused, naming the closest flag.
        (["--num-layer", "2"], "unrecognized argument: --num-layer (did you mean --num-layers?)"),
        (["--seq-len", "16"], "unrecognized argument: --seq-len (did you mean --seq-length?)"),
        (["--hiden-size=8", "--lr-warmup", "3"],
         "unrecognized arguments: --hiden-size (did you mean --hidden-size?), --lr-warmup (did you mean"),
    ],
)
def test_argparse_errors_are_one_config_error_and_abbreviations_are_refused(extra, message, capsys):
    assert_config_error(MOCK + extra, 1, re.escape(message))
    assert capsys.readouterr().err == ""  # printed once, by pretrain_moe.main, not by argparse


def test_data_path_given_with_its_suffix_names_the_prefix_form(tmp_path):
    assert_config_error(["--data-path", str(tmp_path / "corpus.bin"), "--tokenizer-model", "t.model"], 1,
                        re.escape(f"--data-path {tmp_path / 'corpus.bin'}: give the prefix without .bin/.idx "
                                  f"(--data-path {tmp_path / 'corpus'})"))


def test_a_sample_based_run_is_its_samples_over_the_global_batch():
    base = ["--device", "cpu", "--mock-data", "--vocab-size", "200", "--micro-batch-size", "2", "--global-batch-size", "8"]
    cfg = parse_config(base + ["--train-samples", "100", "--lr-warmup-samples", "20", "--lr-decay-samples", "80"],
                       world_size=2)
    assert cfg.train.train_iters == 12  # 100 // 8: Megatron's rule
    assert (cfg.schedule.warmup_iters, cfg.schedule.decay_iters) == (2.5, 10)
    assert parse_config(base + ["--train-samples", "100"], world_size=2).schedule.decay_iters == 12
    assert parse_config(base, world_size=2).train.train_iters == 100
    assert_config_error(base + ["--train-samples", "100", "--train-iters", "5"], 2,
                        "--train-samples and --train-iters are mutually exclusive")
    assert_config_error(base + ["--train-samples", "4"], 2, re.escape("--train-samples 4 is less than one global batch (8)"))


def test_a_models_training_flags_rebuild_it():
    """What an import prints (``ModelConfig.training_flags``) parses back to the same model."""

    deepseek = ModelConfig(
        vocab_size=96, num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, max_position_embeddings=64,
        norm_epsilon=1e-6, swiglu=True, add_bias_linear=False, untie_embeddings_and_output_weights=True,
        multi_latent_attention=True, q_lora_rank=16, kv_lora_rank=12, qk_head_dim=10, qk_pos_emb_head_dim=8,
        v_head_dim=6, qk_layernorm=True, rotary_scaling_factor=4.0, original_max_position_embeddings=16,
        mscale_all_dim=0.8, mtp_num_layers=1, num_experts=8, moe_layer_freq=(0, 1, 1), moe_router_topk=4,
        moe_ffn_hidden_size=16, moe_shared_expert_intermediate_size=16, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=2.5, moe_router_num_groups=4,
        moe_router_group_topk=2, moe_router_renormalize=False)
    gqa = ModelConfig(vocab_size=96, num_layers=2, group_query_attention=True, num_query_groups=2, kv_channels=16,
                      max_position_embeddings=32, num_experts=(4, 8), moe_router_pre_softmax=True)
    for model in (deepseek, gqa):
        argv = ["--device", "cpu", "--mock-data", "--vocab-size", "96", "--seq-length", "16", *model.training_flags()]
        assert parse_config(argv, world_size=1).model == model, model.training_flags()


@pytest.mark.parametrize("extra,message", [
    (["--mtp-num-layers", "1", "--position-embedding-type", "learned_absolute"],
     "--mtp-num-layers with --position-embedding-type learned_absolute is not supported with "
     "--pipeline-model-parallel-size 2"),
    (["--num-layers", "3"], "--num-layers 3 is not divisible by --pipeline-model-parallel-size 2"),
    (["--recompute-granularity", "full", "--recompute-num-layers", "2"],
     "--recompute-num-layers 2 must be in [1, the layers of a pipeline chunk, 1]"),
    (["--global-batch-size", "2", "--micro-batch-size", "2"],
     "the 1F1B schedule needs at least --pipeline-model-parallel-size 2 micro-batches"),
])
def test_what_pipeline_parallelism_cannot_run_is_refused_before_any_work(extra, message):
    assert_config_error(TINY_MOE + ["--pipeline-model-parallel-size", "2"] + extra, 2, re.escape(message))
