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
    "--overlap-param-gather", "--context-parallel-size", "1",
    "--use-flash-attn", "--attention-softmax-in-fp32", "--accumulate-allreduce-grads-in-fp32",
    "--distributed-backend", "nccl", "--num-workers", "2", "--rotary-percent", "1.0",
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
    (["--context-parallel-size", "2"], "--context-parallel-size 2: megamoe supports only 1 "
                                       "(megamoe has no context parallelism)"),
    (["--moe-token-dispatcher-type", "allgather"], "--moe-token-dispatcher-type allgather: megamoe supports only "
                                                   "alltoall"),
    (["--moe-router-load-balancing-type", "sinkhorn"], "--moe-router-load-balancing-type 'sinkhorn': valid values "
                                                       "are ['aux_loss', 'seq_aux_loss', 'global_aux_loss', 'none']"),
    (["--optimizer", "sgd"], "--optimizer sgd: megamoe supports only adam"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "--tokenizer-type 'GPT2BPETokenizer': valid values are"),
    (["--moe-flex-dispatcher-backend", "nccl"], "--moe-flex-dispatcher-backend nccl: megamoe supports only deepep, "
                                                "hybridep"),
    (["--recompute-modules", "core_attn", "attention"], "--recompute-modules attention: megamoe supports only "
                                                        "core_attn, moe_act"),
    (["--moe-router-topk", "1"], "--moe-router-topk 1 with softmax after the top-k .* add --moe-router-pre-softmax"),
    (["--no-moe-router-renormalize"], "--no-moe-router-renormalize applies to --moe-router-score-function sigmoid"),
    (["--moe-router-load-balancing-type", "none"], "--moe-router-load-balancing-type none contradicts "
                                                   "--moe-aux-loss-coeff 0.01"),
    (["--no-position-embedding", "--position-embedding-type", "learned_absolute"],
     "--no-position-embedding contradicts --position-embedding-type learned_absolute"),
])
def test_a_value_megamoe_does_not_do_is_refused_naming_the_valid_ones(extra, message):
    assert_config_error(TINY_MOE + extra, 1, message if ".*" in message else re.escape(message))


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


def test_megatrons_python_list_layer_pattern_is_read_without_evaluating_code():
    from megamoe.model.config import layer_pattern

    assert layer_pattern("([0]*3+[1]*5)") == (0, 0, 0, 1, 1, 1, 1, 1)
    assert layer_pattern("([1]*2+[0])*2") == (1, 1, 0, 1, 1, 0) == layer_pattern("1,1,0,1,1,0")
    assert layer_pattern("[1,0]") == (1, 0) and layer_pattern("2") == 2
    cfg = parse_config(TINY_MOE + ["--num-layers", "4", "--moe-layer-freq", "([0]*1+[1]*3)"], world_size=1)
    assert cfg.model.moe_layers == (1, 2, 3)
    for code in ("[1]*2+__import__('os').system('true')", "[1]*10**9", "[x]*2"):
        assert_config_error(TINY_MOE + ["--moe-layer-freq", code], 1,
                            re.escape("a list expression like '([0]*3+[1]*58)' (integers, lists, + and *)"))


def test_sequence_parallel_at_tensor_parallel_1_is_turned_off_with_a_warning():
    cfg = parse_config(TINY_MOE + ["--sequence-parallel"], world_size=2)
    assert not cfg.parallel.sequence_parallel
    assert any(n.startswith("warning: --sequence-parallel with --tensor-model-parallel-size 1 is turned off")
               for n in cfg.notices)
    assert parse_config(TINY_MOE + ["--sequence-parallel", "--tensor-model-parallel-size", "2"],
                        world_size=2).parallel.sequence_parallel


def test_kernel_fusion_and_extra_flags_are_accepted_with_what_megamoe_does_instead():
    extra = ["--moe-token-dispatcher-type", "flex", "--moe-flex-dispatcher-backend", "hybridep", "--moe-router-fusion",
             "--moe-permute-fusion", "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te",
             "--tp-comm-overlap", "--no-mmap-bin-files", "--no-create-attention-mask-in-dataloader",
             "--auto-detect-ckpt-format", "--dist-ckpt-strictness", "log_all", "--logging-level", "40",
             "--enable-experimental", "--recompute-modules", "core_attn", "moe_act"]
    plain = parse_config(TINY_MOE, world_size=1)
    cfg = parse_config(TINY_MOE + extra, world_size=1)
    for part in ("model", "parallel", "optimizer", "schedule", "data", "train", "checkpoint", "logging"):
        assert getattr(cfg, part) == getattr(plain, part), part
    noted = {n.split(":")[0] for n in cfg.notices}
    assert noted == {"--moe-token-dispatcher-type flex", "--moe-flex-dispatcher-backend hybridep",
                     "--moe-router-fusion", "--moe-permute-fusion", "--cross-entropy-loss-fusion",
                     "--cross-entropy-fusion-impl te", "--tp-comm-overlap", "--no-mmap-bin-files",
                     "--no-create-attention-mask-in-dataloader", "--auto-detect-ckpt-format",
                     "--dist-ckpt-strictness log_all", "--logging-level 40", "--enable-experimental",
                     "--recompute-modules core_attn moe_act"}
    assert any("runs as this all-to-all" in n for n in cfg.notices)


def test_megatron_flags_that_change_the_run_set_megamoes_config():
    cfg = parse_config(TINY_MOE + [
        "--make-vocab-size-divisible-by", "1187", "--rotary-seq-len-interpolation-factor", "2",
        "--moe-router-force-load-balancing", "--distributed-timeout-minutes", "60", "--manual-gc",
        "--manual-gc-interval", "5", "--lr-warmup-init", "1e-4", "--log-throughput", "--log-num-zeros-in-grad",
        "--log-timers-to-tensorboard", "--log-memory-to-tensorboard", "--log-validation-ppl-to-tensorboard",
        "--no-save-optim", "--save", "unused"], world_size=1)
    model, log = cfg.model, cfg.logging
    assert (model.make_vocab_size_divisible_by, model.rotary_seq_len_interpolation_factor) == (1187, 2)
    assert model.moe_router_force_load_balancing and cfg.train.distributed_timeout_minutes == 60
    assert cfg.train.manual_gc and cfg.train.manual_gc_interval == 5 and cfg.schedule.warmup_init == 1e-4
    assert log.log_throughput and log.log_num_zeros_in_grad and log.log_timers_to_tensorboard
    assert log.log_memory_to_tensorboard and log.log_validation_ppl_to_tensorboard and cfg.checkpoint.no_save_optim
    assert cfg.notices == []


def test_mock_data_with_a_tokenizer_takes_its_vocabulary_and_eod(tmp_path):
    """As in Megatron, --mock-data with a tokenizer sizes the vocabulary by the tokenizer."""
    pytest.importorskip("transformers")
    from tests.fixtures import make_documents, make_hf_tokenizer

    tok_dir = make_hf_tokenizer(tmp_path / "tok", make_documents(50))
    argv = [a for a in TINY_MOE]
    del argv[argv.index("--vocab-size"):argv.index("--vocab-size") + 2]
    cfg = parse_config(argv + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_dir], world_size=1)
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tok_dir)
    assert cfg.model.vocab_size == len(reference) and cfg.eod_token_id == reference.eos_token_id
