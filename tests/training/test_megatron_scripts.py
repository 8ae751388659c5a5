"""Megatron-LM's published MoE launch scripts train on 4 CPU ranks as written, with only their
sizes and parallel degrees shrunk: the Mixtral 8x7B example (examples/mixtral), the
Megatron-Core MoE README's quick-start and performance-tips blocks, the Megatron MoE model zoo's
Qwen3-30B-A3B config and its DeepSeek-V3 config (at PP 1), and the Mixtral example at its own
pipeline parallelism, PP 2 x EP 2.  Each flag list below keeps the script's order and values; a
comment marks every value that was shrunk or a flag that was left out, and why.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

from tests.fixtures import make_documents, make_hf_tokenizer, read_json_log, write_jsonl
from tests.harness import run_distributed

WORLD = 4


def _launch(rank, world, argv):
    """pretrain_moe.main(argv) on this rank; returns what it printed (rank 0 prints the log)."""
    import pretrain_moe

    os.environ["WORLD_SIZE"] = str(world)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = pretrain_moe.main(argv)
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


def _train(argv) -> str:
    return run_distributed(_launch, WORLD, ["--device", "cpu"] + argv, timeout=400)[0]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """A 60-document corpus preprocessed twice: with a sentencepiece model (Mixtral's
    Llama2Tokenizer) and with a Hugging Face tokenizer directory (Qwen3's and DeepSeek's
    HuggingFaceTokenizer), through tools/preprocess_data.py's code."""
    pytest.importorskip("transformers")
    from megamoe.data.preprocess import preprocess
    from megamoe.data.tokenizer_training import train_sentencepiece

    root = tmp_path_factory.mktemp("megatron_scripts")
    docs = [d for d in make_documents(60, seed=3) if d]
    jsonl = write_jsonl(root / "docs.jsonl", docs)
    sp_model = train_sentencepiece(iter(docs), model_prefix=str(root / "sp"), vocab_size=300)
    preprocess([jsonl], tokenizer_model=sp_model, output_prefix=str(root / "sp_data"), progress=None)
    hf_dir = make_hf_tokenizer(root / "hf_tokenizer", docs)
    preprocess([jsonl], tokenizer_model=hf_dir, tokenizer_type="HuggingFaceTokenizer",
               output_prefix=str(root / "hf_data"), progress=None)
    return dict(sp_model=sp_model, sp_data=str(root / "sp_data"), hf_dir=hf_dir, hf_data=str(root / "hf_data"))


def _scalars(directory) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return set(events.Tags()["scalars"])


def _mixtral_argv(tmp_path, corpora, checkpoints, pp: int, ep: int) -> list[str]:
    """examples/mixtral/train_mixtral_8x7b_distributed.sh's flags, at PP ``pp`` and EP ``ep``."""
    return [
        # MODEL_ARGS
        "--use-mcore-models", "--disable-bias-linear",
        "--seq-length", "16", "--max-position-embeddings", "64",  # 4096, 32768
        "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "48", "--num-attention-heads", "4",
        "--init-method-std", "0.01", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
        "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
        "--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", "2",  # 8
        "--no-masked-softmax-fusion", "--no-position-embedding", "--rotary-base", "1000000",
        # MOE_ARGS
        "--num-experts", "4", "--moe-router-topk", "2",  # 8 experts
        "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "1e-2", "--moe-grouped-gemm",
        "--moe-token-dispatcher-type", "alltoall", "--overlap-param-gather", "--overlap-grad-reduce",
        # DATA_ARGS
        "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", corpora["sp_model"],
        "--data-path", corpora["sp_data"], "--split", "99990,8,2",
        # TRAINING_ARGS
        "--micro-batch-size", "1", "--global-batch-size", "4",  # 256
        "--lr", "1e-4", "--train-iters", "2", "--lr-decay-iters", "320000", "--lr-decay-style", "cosine",  # 500000
        "--min-lr", "1.0e-5", "--weight-decay", "0.1", "--lr-warmup-iters", "500", "--clip-grad", "1.0", "--bf16",
        # MODEL_PARALLEL_ARGS
        "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", str(pp),  # 4
        "--expert-model-parallel-size", str(ep), "--use-distributed-optimizer", "--sequence-parallel",  # EP 8
        # LOGGING_ARGS
        "--log-interval", "1", "--save-interval", "2", "--eval-interval", "1", "--eval-iters", "1",  # 10000, 1000, 10
        "--save", str(checkpoints), "--load", str(checkpoints), "--tensorboard-dir", str(checkpoints / "tensorboard"),
        "--no-load-optim", "--no-load-rng",
        "--log-json", str(tmp_path / "log.jsonl"),  # megamoe's, for this test to read
    ]


def test_mixtral_8x7b_example(tmp_path, corpora):
    """examples/mixtral/train_mixtral_8x7b_distributed.sh at PP 1, EP 4: --sequence-parallel at
    TP 1 is turned off with a warning, and --split 99990,8,2 leaves a small corpus no validation
    documents, so evaluation is skipped with a log line, as in Megatron."""
    checkpoints = tmp_path / "ckpt"
    out = _train(_mixtral_argv(tmp_path, corpora, checkpoints, pp=1, ep=4))
    assert "--sequence-parallel with --tensor-model-parallel-size 1 is turned off" in out
    assert "--split 99990,8,2: the validation split is empty; evaluation is skipped" in out
    records = read_json_log(tmp_path / "log.jsonl")
    assert [r["iteration"] for r in records] == [1, 2] and all("split" not in r for r in records)
    assert os.path.isdir(checkpoints / "iter_0000002")
    assert "train/lm_loss" in _scalars(checkpoints / "tensorboard")


def test_moe_readme_quick_start_and_performance_tips(tmp_path):
    """The quick-start block, then the general performance tips added to the same script (the
    tips' dispatcher replaces the quick start's, as argparse's last value does in Megatron); the
    README writes two of the flags YAML-style (``--moe-shared-expert-intermediate-size: 2048``,
    ``--manual-gc: true``), given here as the flags they name."""
    argv = [
        "--mock-data", "--vocab-size", "200", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--ffn-hidden-size", "48", "--seq-length", "16", "--swiglu",
        "--disable-bias-linear", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "2",
        "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--sequence-parallel",
        "--log-json", str(tmp_path / "log.jsonl"),
        # Quick start
        "--num-experts", "8", "--moe-shared-expert-intermediate-size", "32",  # 2048
        "--moe-router-load-balancing-type", "aux_loss", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2",
        "--moe-token-dispatcher-type", "alltoall",
        # General performance tips
        "--moe-token-dispatcher-type", "flex", "--moe-flex-dispatcher-backend", "deepep",
        "--moe-grouped-gemm",
        "--moe-router-fusion", "--moe-permute-fusion", "--cross-entropy-loss-fusion",
        "--cross-entropy-fusion-impl", "te",
        "--use-distributed-optimizer", "--overlap-param-gather", "--overlap-grad-reduce", "--tp-comm-overlap",
        "--manual-gc", "--manual-gc-interval", "1",  # 10: collect inside this 2-iteration run
    ]
    out = _train(argv)
    for flag in ("--moe-token-dispatcher-type flex", "--moe-flex-dispatcher-backend deepep", "--moe-router-fusion",
                 "--moe-permute-fusion", "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl te",
                 "--tp-comm-overlap"):
        assert f"{flag}: accepted for Megatron compatibility" in out, flag
    assert [r["iteration"] for r in read_json_log(tmp_path / "log.jsonl")] == [1, 2]


def test_model_zoo_qwen3_30b_a3b(tmp_path, corpora):
    """Megatron-MoE-ModelZoo model_configs/benchmarking/Qwen3-30B-A3B.yaml at TP 2, EP 2, ETP 1
    with sequence parallelism: a Hugging Face tokenizer, a vocabulary divisor of 1187, logging
    of zeros in the gradient, throughput and (with tensorboard) timers, memory and validation
    perplexity."""
    pytest.importorskip("tensorboard")
    out_dir, load_dir = tmp_path / "out", tmp_path / "load"
    load_dir.mkdir()
    argv = [
        # Distributed args
        "--distributed-timeout-minutes", "60", "--tensor-model-parallel-size", "2",
        "--pipeline-model-parallel-size", "1", "--expert-model-parallel-size", "2",  # no virtual pipeline at PP 1
        "--context-parallel-size", "1", "--expert-tensor-parallel-size", "1", "--use-distributed-optimizer",
        "--overlap-grad-reduce", "--overlap-param-gather", "--no-create-attention-mask-in-dataloader",
        # Training args
        "--use-mcore-models", "--sequence-parallel", "--use-flash-attn", "--disable-bias-linear",
        "--micro-batch-size", "1", "--global-batch-size", "4", "--train-samples", "8",  # 268554688
        "--exit-duration-in-mins", "230", "--manual-gc", "--manual-gc-interval", "5",
        # Transformer Engine args
        "--transformer-impl", "transformer_engine",
        # Data args
        "--data-cache-path", str(tmp_path / "data_cache"), "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", corpora["hf_dir"], "--data-path", corpora["hf_data"], "--split", "99,1,0",
        "--no-mmap-bin-files", "--num-workers", "6",
        # Network size args
        "--untie-embeddings-and-output-weights", "--position-embedding-type", "rope", "--rotary-percent", "1.0",
        "--rotary-base", "1000000", "--rotary-seq-len-interpolation-factor", "1", "--normalization", "RMSNorm",
        "--swiglu", "--norm-epsilon", "1e-06", "--num-layers", "2", "--hidden-size", "32",  # 48, 2048
        "--ffn-hidden-size", "48", "--num-attention-heads", "4", "--group-query-attention",  # 6144, 32
        "--num-query-groups", "2", "--kv-channels", "8", "--qk-layernorm", "--seq-length", "16",  # 4, 128
        "--max-position-embeddings", "64", "--make-vocab-size-divisible-by", "1187",  # 40960
        # Regularization args
        "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--clip-grad", "1.0", "--weight-decay", "0.1",
        # Learning rate args
        "--lr-decay-samples", "8", "--lr-warmup-samples", "4", "--lr", "1.2e-4", "--min-lr", "1.2e-5",
        "--lr-decay-style", "cosine", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
        # MoE args (--moe-router-pre-softmax: false, so not given)
        "--num-experts", "8", "--moe-ffn-hidden-size", "16", "--moe-router-load-balancing-type", "aux_loss",
        "--moe-router-topk", "2", "--moe-grouped-gemm", "--moe-aux-loss-coeff", "1e-3",  # 128, 768, 8
        "--moe-token-dispatcher-type", "alltoall", "--moe-permute-fusion", "--moe-router-dtype", "fp32",
        # Validation args
        "--eval-iters", "1", "--eval-interval", "1",  # 32, 500
        # Checkpointing args
        "--finetune", "--auto-detect-ckpt-format", "--load", str(load_dir), "--save", str(out_dir / "checkpoints"),
        "--save-interval", "2", "--dist-ckpt-strictness", "log_all",  # 500
        # Initialization args
        "--init-method-std", "0.02",
        # Logging args (no wandb: optional, by environment)
        "--log-timers-to-tensorboard", "--log-memory-to-tensorboard", "--log-num-zeros-in-grad", "--log-params-norm",
        "--log-validation-ppl-to-tensorboard", "--log-throughput", "--log-interval", "1",
        "--tensorboard-dir", str(out_dir / "tensorboard"),
        # Mixed precision args
        "--bf16",
        "--log-json", str(tmp_path / "log.jsonl"),
    ]
    out = _train(argv)
    assert "tok/s" in out and "zeros in grad" in out
    records = read_json_log(tmp_path / "log.jsonl")
    train = [r for r in records if "split" not in r]
    assert [r["iteration"] for r in train] == [1, 2]
    assert all(r["num_zeros_in_grad"] >= 0 and r["params_norm"] > 0 for r in train)
    assert [r["iteration"] for r in records if r.get("split") == "valid"] == [1, 2]
    scalars = _scalars(out_dir / "tensorboard")
    assert {"train/elapsed_ms_per_iter", "train/tokens_per_sec", "train/num_zeros_in_grad", "valid/ppl"} <= scalars
    with open(out_dir / "checkpoints" / "iter_0000002" / "metadata.json") as f:
        assert json.load(f)["model_config"]["make_vocab_size_divisible_by"] == 1187


def test_model_zoo_deepseek_v3(tmp_path, corpora):
    """Megatron-MoE-ModelZoo model_configs/benchmarking/DeepSeek-V3.yaml at EP 4 and PP 1:
    multi-latent attention with YaRN, sigmoid routing with an expert bias, group-limited,
    seq_aux_loss, dense first layers by a Python-list --moe-layer-freq, --lr-warmup-init,
    weights-only checkpoints."""
    out_dir, load_dir = tmp_path / "out", tmp_path / "load"
    load_dir.mkdir()
    argv = [
        # Distributed args
        "--distributed-timeout-minutes", "60", "--tensor-model-parallel-size", "1",
        "--pipeline-model-parallel-size", "1", "--expert-model-parallel-size", "4", "--context-parallel-size", "1",
        "--expert-tensor-parallel-size", "1", "--use-distributed-optimizer", "--overlap-grad-reduce",
        "--overlap-param-gather",
        # Training args
        "--use-mcore-models", "--sequence-parallel", "--use-flash-attn", "--disable-bias-linear",
        "--micro-batch-size", "1", "--global-batch-size", "4", "--train-samples", "8",  # 585937500
        "--exit-duration-in-mins", "220", "--no-save-optim", "--no-check-for-nan-in-loss-and-grad",
        "--cross-entropy-loss-fusion",
        "--cross-entropy-fusion-impl", "native", "--manual-gc", "--manual-gc-interval", "10",
        # Transformer Engine args
        "--transformer-impl", "transformer_engine",
        # Data args
        "--seq-length", "16", "--data-cache-path", str(tmp_path / "data_cache"),
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", corpora["hf_dir"],
        "--data-path", corpora["hf_data"], "--split", "99,1,0", "--no-mmap-bin-files",
        "--no-create-attention-mask-in-dataloader", "--num-workers", "6",
        # Network size args
        "--num-layers", "4", "--hidden-size", "32", "--ffn-hidden-size", "48",  # 61, 7168, 18432
        "--num-attention-heads", "4", "--kv-channels", "8", "--max-position-embeddings", "64",  # 128, 128, 4096
        "--position-embedding-type", "rope", "--rotary-base", "10000", "--make-vocab-size-divisible-by", "3232",
        "--normalization", "RMSNorm", "--norm-epsilon", "1e-6", "--swiglu", "--untie-embeddings-and-output-weights",
        "--multi-latent-attention",
        # Regularization args
        "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--clip-grad", "1.0", "--weight-decay", "0.1",
        "--qk-layernorm",
        # Learning rate args
        "--lr-decay-samples", "8", "--lr-warmup-samples", "4", "--lr-warmup-init", "3.9e-7", "--lr", "3.9e-6",
        "--min-lr", "3.9e-7", "--lr-decay-style", "cosine", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
        # MoE args
        "--num-experts", "16", "--moe-layer-freq", "([0]*1+[1]*3)",  # 256, ([0]*3+[1]*58)
        "--moe-ffn-hidden-size", "16", "--moe-shared-expert-intermediate-size", "16",  # 2048, 2048
        "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-router-topk", "4", "--moe-grouped-gemm",  # 8
        "--moe-aux-loss-coeff", "1e-4", "--moe-router-group-topk", "2", "--moe-router-num-groups", "4",  # 4, 8
        "--moe-router-topk-scaling-factor", "2.5", "--moe-router-score-function", "sigmoid",
        "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "1e-3", "--moe-router-dtype", "fp32",
        "--moe-permute-fusion", "--moe-router-fusion",
        # MLA args
        "--q-lora-rank", "16", "--kv-lora-rank", "8", "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "4",  # 1536, 512, 128, 64
        "--v-head-dim", "8", "--rotary-scaling-factor", "40", "--mscale", "1.0", "--mscale-all-dim", "1.0",  # 128
        # Validation args
        "--eval-iters", "1", "--eval-interval", "1",  # 32, 200
        # Checkpointing args (--finetune: false, so not given)
        "--no-load-optim", "--no-load-rng", "--auto-detect-ckpt-format", "--load", str(load_dir),
        "--save", str(out_dir / "checkpoints"), "--save-interval", "2", "--dist-ckpt-strictness", "log_all",  # 500
        # Initialization args
        "--init-method-std", "0.02",
        # Logging args (--log-num-zeros-in-grad and --log-params-norm: false; no wandb)
        "--log-timers-to-tensorboard", "--log-memory-to-tensorboard", "--log-validation-ppl-to-tensorboard",
        "--log-throughput", "--log-interval", "1", "--logging-level", "40",
        "--tensorboard-dir", str(out_dir / "tensorboard"),
        # Mixed precision args
        "--bf16",
        # Experimental args
        "--enable-experimental",
        "--log-json", str(tmp_path / "log.jsonl"),
    ]
    out = _train(argv)
    assert "--enable-experimental: accepted for Megatron compatibility" in out
    assert "--kv-channels 8 with --multi-latent-attention: unused, as in Megatron" in out
    records = read_json_log(tmp_path / "log.jsonl")
    assert [r["iteration"] for r in records if "split" not in r] == [1, 2]
    assert all(r["aux_loss"] > 0 for r in records if "split" not in r)
    with open(out_dir / "checkpoints" / "iter_0000002" / "metadata.json") as f:
        metadata = json.load(f)
    assert metadata["optimizer"] is None, "--no-save-optim saves the weights only"
    assert metadata["model_config"]["moe_layer_freq"] == [0, 1, 1, 1]


def test_mixtral_8x7b_example_with_pipeline_parallelism(tmp_path, corpora):
    """The same script at its own pipeline parallelism, shrunk to PP 2 x EP 2 on 4 ranks: 1F1B
    over two stages of one layer each, the logged losses and the evaluation (forward only through
    the stages) reach rank 0's log, and its checkpoint records the pipeline layout (loading across
    PP: tests/checkpointing/test_pipeline.py)."""
    checkpoints = tmp_path / "ckpt"
    argv = _mixtral_argv(tmp_path, corpora, checkpoints, pp=2, ep=2)
    argv[argv.index("99990,8,2")] = "80,20,0"  # a validation split this small corpus fills
    out = _train(argv)
    assert "training: world 4 (PP 2 x TP 1 x DP 2), ETP 1, EP per MoE layer [2, 2]" in out
    records = read_json_log(tmp_path / "log.jsonl")
    train = [r for r in records if "split" not in r]
    assert [r["iteration"] for r in train] == [1, 2]
    assert all(r["lm_loss"] > 1.0 and r["aux_loss"] > 0 and r["grad_norm"] > 0 for r in train)
    assert [(r["iteration"], r["lm_loss"] > 1.0) for r in records if r.get("split") == "valid"] == [(1, True), (2, True)]
    with open(checkpoints / "iter_0000002" / "metadata.json") as f:
        assert json.load(f)["layout"]["pipeline_model_parallel_size"] == 2
