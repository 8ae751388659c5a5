"""Hugging Face import of grouped-query Mixtral and Qwen3-MoE: tiny random models made by
transformers itself, imported at TP 1 and 2 and EP 1, 2 and 4, compute transformers' logits
(fp32, 1e-4); an export of the import gives back the original tensors and configuration; what
megamoe cannot express is refused by name."""

import json
import math
import os
import re

import pytest
import torch

from megamoe.checkpointing.convert.run import convert
from megamoe.checkpointing.format import CheckpointError, model_config_from_dict, read_metadata
from megamoe.checkpointing.hf.config import from_hf_config
from megamoe.model.config import ModelConfig
from megamoe.model.gpt import GPTModel
from megamoe.parallel.mappings import gather_from_tp_region
from megamoe.training.checkpoint import open_checkpoint
from tests.harness import init_layout, run_distributed
from tests.checkpointing.hf.hf_files import config_only_dir, round_trip

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 96, 12
LAYOUTS = [(1, 1), (1, 4), (2, 2)]  # (TP, EP) on 4 ranks


def _mixtral_gqa():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
        initializer_range=0.2, tie_word_embeddings=False, sliding_window=None,
    ))


def _qwen3_moe(norm_topk_prob):
    # head_dim 12 x 4 heads != hidden 32 (--kv-channels), layer 1 dense (mlp_only_layers)
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=4, num_experts_per_tok=2,
        mlp_only_layers=[1], norm_topk_prob=norm_topk_prob, max_position_embeddings=32, initializer_range=0.2,
        tie_word_embeddings=norm_topk_prob,
    ))


MODELS = {
    "mixtral-gqa": _mixtral_gqa,
    "qwen3-moe": lambda: _qwen3_moe(False),
    "qwen3-moe-norm-topk": lambda: _qwen3_moe(True),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def hf_model(request, tmp_path_factory):
    """(directory of the saved HF model, its logits for TOKENS, tokens)."""
    torch.manual_seed(0)
    model = MODELS[request.param]().float().eval()
    with torch.no_grad():  # norms away from 1 so that a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    root = str(tmp_path_factory.mktemp(request.param) / "hf")
    model.save_pretrained(root)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens).logits
    return root, logits, tokens


def _logits_at_layouts(rank, world, roots, tokens):
    out = []
    for (tp, ep), root in zip(LAYOUTS, roots):
        config = model_config_from_dict(read_metadata(root)[1]["model_config"])
        layout = init_layout(tp, (ep,), experts_by_layer=config.experts_by_layer())
        model = GPTModel(config, layout).eval()
        open_checkpoint(root, config, layout).load_model(model)
        with torch.no_grad():
            out.append(gather_from_tp_region(model(tokens).logits, layout)[..., :VOCAB])
    return out


def test_imported_model_computes_transformers_logits_at_every_layout(hf_model, tmp_path):
    root, want, tokens = hf_model
    roots = []
    for tp, ep in LAYOUTS:
        roots.append(str(tmp_path / f"tp{tp}ep{ep}"))
        convert(root, roots[-1], from_format="hf", target_world_size=4, target_tensor_parallel_size=tp,
                target_expert_parallel_size=(ep,), progress=None)
    per_rank = run_distributed(_logits_at_layouts, 4, roots, tokens, timeout=300)
    for rank_logits in per_rank:
        for (tp, ep), got in zip(LAYOUTS, rank_logits):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"TP {tp} EP {ep}: {m}")


def test_export_of_the_import_equals_the_original(hf_model, tmp_path):
    root, _, _ = hf_model
    (imported, exported, again), got, want = round_trip(root, tmp_path)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    original, exported_config = (json.load(open(os.path.join(d, "config.json"))) for d in (root, exported))
    for key in ("model_type", "num_key_value_heads", "head_dim", "mlp_only_layers", "norm_topk_prob",
                "intermediate_size", "moe_intermediate_size", "tie_word_embeddings"):
        assert exported_config.get(key) == original.get(key), key
    convert(exported, again, from_format="hf", target_world_size=2, target_tensor_parallel_size=2, progress=None)
    configs = [read_metadata(d)[1]["model_config"] for d in (imported, again)]
    assert configs[0] == configs[1]


QWEN3 = dict(model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
             num_experts_per_tok=2, max_position_embeddings=32)


@pytest.mark.parametrize("change,message", [
    (dict(use_sliding_window=True, sliding_window=8), "sliding_window 8 < max_position_embeddings 32"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(model_type="deepseek_v2", kv_lora_rank=16), r"model_type 'deepseek_v2' \(kv_lora_rank \(multi-head latent attention\)"),
    (dict(model_type="deepseek_v3", n_shared_experts=1), "no field 'kv_lora_rank'"),
    (dict(mlp_only_layers=[0, 1]), "no MoE layer"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(num_key_value_heads=3), "num_key_value_heads 3 does not divide num_attention_heads 4"),
])
def test_import_refuses_what_megamoe_cannot_express_in_one_line(tmp_path, change, message):
    root = config_only_dir(tmp_path, {**QWEN3, **change})
    with pytest.raises(CheckpointError, match=re.escape(os.path.join(root, "config.json")) + ".*" + message) as err:
        convert(root, str(tmp_path / "dst"), from_format="hf", progress=None)
    assert "\n" not in str(err.value)


def test_export_picks_qwen3_moe_for_qk_norm_and_names_what_neither_family_has():
    from megamoe.checkpointing.hf.config import check_exportable, export_family

    qwen = ModelConfig(vocab_size=64, num_layers=2, hidden_size=32, num_attention_heads=4, qk_layernorm=True,
                       num_experts=4, moe_layer_freq=(1, 0), moe_router_pre_softmax=True,
                       swiglu=True, add_bias_linear=False)
    assert export_family(qwen) == "qwen3_moe"
    check_exportable(qwen)
    sigmoid = ModelConfig(vocab_size=64, num_layers=2, hidden_size=32, num_attention_heads=4, qk_layernorm=True,
                          num_experts=4, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                          moe_router_num_groups=2, moe_router_group_topk=1, swiglu=True, add_bias_linear=False)
    with pytest.raises(ValueError, match="Qwen3-MoE") as err:
        check_exportable(sigmoid)
    for flag in ("--moe-router-score-function sigmoid", "--moe-router-enable-expert-bias", "--moe-router-num-groups"):
        assert flag in str(err.value), flag


def _train(rank, world, argv):
    import pretrain_moe

    os.environ["WORLD_SIZE"] = str(world)
    assert pretrain_moe.main(argv) == 0


def test_imported_qwen3_moe_trains_from_the_command_line(tmp_path):
    """The README's recipe at toy size: import at EP 2, then pretrain_moe.py --load --finetune with
    the flags that describe the same model (a mismatch would be refused before training)."""
    torch.manual_seed(0)
    _qwen3_moe(False).save_pretrained(str(tmp_path / "hf"))
    convert(str(tmp_path / "hf"), str(tmp_path / "ckpt"), from_format="hf", target_world_size=2,
            target_expert_parallel_size=(2,), progress=None)
    argv = [
        "--device", "cpu", "--mock-data", "--vocab-size", str(VOCAB), "--seq-length", str(SEQ),
        "--num-layers", "3", "--hidden-size", "32", "--ffn-hidden-size", "40", "--num-attention-heads", "4",
        "--kv-channels", "12", "--group-query-attention", "--num-query-groups", "2", "--qk-layernorm",
        "--max-position-embeddings", "32", "--normalization", "RMSNorm", "--norm-epsilon", "1e-6", "--swiglu",
        "--rotary-base", "10000", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
        "--init-method-std", "0.2", "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16",
        "--moe-router-pre-softmax", "--moe-aux-loss-coeff", "0.001",
        "--moe-layer-freq", "1,0,1", "--expert-model-parallel-size", "2",
        "--load", str(tmp_path / "ckpt"), "--finetune", "--train-iters", "2", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--log-json", str(tmp_path / "log.jsonl"),
    ]
    run_distributed(_train, 2, argv, timeout=300)
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl") if line.strip()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert all(math.isfinite(r["lm_loss"]) for r in records)


@pytest.mark.parametrize("step, dense", [(2, []), (3, []), (2, [3]), (1, [0, 2])])
def test_qwen3_moe_layer_pattern_is_transformers_own(step, dense):
    """Which layers are MoE (``decoder_sparse_step``, ``mlp_only_layers``) is read as transformers
    builds them: a step other than 1 shows an off-by-one."""
    hf = {**QWEN3, "num_hidden_layers": 6, "decoder_sparse_step": step, "mlp_only_layers": dense}
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**{k: v for k, v in hf.items()
                                                                           if k != "model_type"}))
    want = tuple(int(type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock") for layer in model.model.layers)
    assert 0 < sum(want) < len(want), want
    config = from_hf_config(hf)
    assert tuple(int(config.is_moe_layer(i)) for i in range(config.num_layers)) == want
