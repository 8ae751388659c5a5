"""Hugging Face DeepSeek-V3 import and export: tiny random models made by transformers itself
(3 layers, the first dense; multi-latent attention with q-lora on and off; YaRN; group-limited
sigmoid routing with an expert bias; a shared expert; interleaved RoPE rows), imported at (TP, EP)
= (1, 1), (2, 2) with sequence parallelism, and (1, 4), compute transformers' logits (fp32, 1e-4).
One model carries DeepSeek's MTP weights (``model.layers.3.*``, which transformers itself does not
run): they are imported, and the export of the import gives back every original tensor
bitwise.  An import trains from the command line at EP 2 with --use-checkpoint-args; what megamoe
cannot express is refused by name."""

import json
import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from megamoe.checkpointing.convert.run import convert
from megamoe.checkpointing.format import CheckpointError, model_config_from_dict, read_metadata
from megamoe.model.gpt import GPTModel
from megamoe.parallel.mappings import gather_from_tp_region
from megamoe.training.checkpoint import open_checkpoint
from tests.harness import init_layout, run_distributed
from tests.checkpointing.hf.hf_files import config_only_dir, round_trip

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 96, 12
LAYOUTS = [(1, 1), (2, 2), (1, 4)]  # (TP, EP) on 4 ranks; sequence parallelism where TP > 1


def _config(q_lora_rank, layers=3, **fields):
    return transformers.DeepseekV3Config(**{**dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=layers,
        num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=12,
        q_lora_rank=q_lora_rank, qk_rope_head_dim=8, v_head_dim=6, qk_nope_head_dim=10, n_group=4, topk_group=2,
        num_experts_per_tok=4, first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=64,
        rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False, rope_interleave=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 0.8,
                         "beta_fast": 32, "beta_slow": 1},
    ), **fields})


def _randomised(config):
    """transformers' model with norms away from 1 and expert biases away from 0, so a misplaced
    one shows."""
    model = transformers.DeepseekV3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def _add_mtp_weights(model, root):
    """DeepSeek's layout of one MTP depth in ``root``: layer 3 of a 4-layer twin (an MoE layer),
    its enorm / hnorm / eh_proj / shared_head.norm, and copies of the embedding and the head."""
    tensors = load_file(os.path.join(root, "model.safetensors"))
    twin = _randomised(_config(model.config.q_lora_rank, layers=4))
    twin.save_pretrained(os.path.join(root, "twin"))
    extra = load_file(os.path.join(root, "twin", "model.safetensors"))
    mtp = "model.layers.3."
    tensors.update({k: v for k, v in extra.items() if k.startswith(mtp)})
    tensors.update({
        mtp + "enorm.weight": 1.0 + 0.3 * torch.randn(32), mtp + "hnorm.weight": 1.0 + 0.3 * torch.randn(32),
        mtp + "eh_proj.weight": 0.2 * torch.randn(32, 64), mtp + "shared_head.norm.weight": 1.0 + 0.3 * torch.randn(32),
        mtp + "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
        mtp + "shared_head.head.weight": tensors["lm_head.weight"].clone(),
    })
    save_file(tensors, os.path.join(root, "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(root, "config.json")))
    json.dump({**config, "num_nextn_predict_layers": 1}, open(os.path.join(root, "config.json"), "w"))


MODELS = {"q-lora-mtp": 16, "no-q-lora": None}


def _save(name: str, root: str):
    """Save the model ``name`` of MODELS to ``root``; returns it."""
    torch.manual_seed(0)
    mtp = name.endswith("mtp")
    config = _config(MODELS[name]) if mtp else _config(None, n_group=1, topk_group=1, norm_topk_prob=False)
    model = _randomised(config)
    model.save_pretrained(root)
    if mtp:
        _add_mtp_weights(model, root)
    else:
        config_path = os.path.join(root, "config.json")
        json.dump({**json.load(open(config_path)), "num_nextn_predict_layers": 0}, open(config_path, "w"))
    return model


@pytest.fixture(scope="module", params=sorted(MODELS))
def hf_model(request, tmp_path_factory):
    """(directory of the saved HF model, its logits for the tokens, tokens, whether it has MTP)."""
    root = str(tmp_path_factory.mktemp(request.param) / "hf")
    model = _save(request.param, root)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens).logits
    return root, logits, tokens, request.param.endswith("mtp")


def _logits_at_layouts(rank, world, roots, tokens):
    out = []
    for (tp, ep), root in zip(LAYOUTS, roots):
        config = model_config_from_dict(read_metadata(root)[1]["model_config"])
        layout = init_layout(tp, (ep,), sp=tp > 1, experts_by_layer=config.experts_by_layer())
        model = GPTModel(config, layout).eval()
        open_checkpoint(root, config, layout).load_model(model)
        with torch.no_grad():
            out.append(gather_from_tp_region(model(tokens).logits, layout)[..., :VOCAB])
    return out


def test_imported_deepseek_v3_computes_transformers_logits_at_every_layout(hf_model, tmp_path):
    root, want, tokens, mtp = hf_model
    roots = []
    for tp, ep in LAYOUTS:
        roots.append(str(tmp_path / f"tp{tp}ep{ep}"))
        convert(root, roots[-1], from_format="hf", target_world_size=4, target_tensor_parallel_size=tp,
                target_expert_parallel_size=(ep,), progress=None)
    config = model_config_from_dict(read_metadata(roots[0])[1]["model_config"])
    assert config.multi_latent_attention and config.rope_type == "yarn" and config.moe_layers == (1, 2)
    assert config.mtp_num_layers == (1 if mtp else None)
    per_rank = run_distributed(_logits_at_layouts, 4, roots, tokens, timeout=300)
    for rank_logits in per_rank:
        for (tp, ep), got in zip(LAYOUTS, rank_logits):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"TP {tp} EP {ep}: {m}")


def test_export_of_the_import_equals_the_original_tensor_for_tensor(hf_model, tmp_path):
    root, logits, tokens, mtp = hf_model
    (imported, exported, again), got, want = round_trip(root, tmp_path)
    assert got.keys() == want.keys()
    assert any(name.startswith("model.layers.3.") for name in want) == mtp
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    original, exported_config = (json.load(open(os.path.join(d, "config.json"))) for d in (root, exported))
    for key in ("model_type", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "first_k_dense_replace", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
                "n_shared_experts", "num_nextn_predict_layers", "rope_interleave"):
        assert exported_config.get(key) == original.get(key), key
    for key in ("factor", "original_max_position_embeddings", "mscale", "mscale_all_dim", "beta_fast", "beta_slow"):
        assert exported_config["rope_scaling"][key] == original["rope_parameters"][key], key
    reloaded = transformers.DeepseekV3ForCausalLM.from_pretrained(exported).float().eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, logits, rtol=0, atol=0)  # transformers reads the export
    convert(exported, again, from_format="hf", target_world_size=2, target_tensor_parallel_size=2, progress=None)
    configs = [read_metadata(d)[1]["model_config"] for d in (imported, again)]
    assert configs[0] == configs[1]


DEEPSEEK = {**_config(16).to_dict(), "model_type": "deepseek_v3"}


@pytest.mark.parametrize("change,message", [
    (dict(model_type="deepseek_v2"), "model_type 'deepseek_v2'.*DeepSeek-V2's routing"),
    (dict(scoring_func="softmax"), "scoring_func 'softmax' (DeepSeek-V2's routing"),
    (dict(topk_method="group_limited_greedy"), "topk_method 'group_limited_greedy'"),
    (dict(quantization_config={"quant_method": "fp8"}), "quantization_config (fp8 weights"),
    (dict(n_shared_experts=0), "n_shared_experts 0"),
    (dict(num_experts_per_tok=6), "num_experts_per_tok 6 with topk_group 2"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "RoPE type 'longrope'"),
])
def test_import_refuses_what_megamoe_cannot_express_in_one_line(tmp_path, change, message):
    root = config_only_dir(tmp_path, {**DEEPSEEK, **change})
    pattern = re.escape(os.path.join(root, "config.json")) + ".*" + (message if ".*" in message else re.escape(message))
    with pytest.raises(CheckpointError, match=pattern) as err:
        convert(root, str(tmp_path / "dst"), from_format="hf", progress=None)
    assert "\n" not in str(err.value)


def test_export_names_what_deepseek_v3_cannot_hold():
    from megamoe.checkpointing.hf.config import check_exportable
    from tests.tiny_moe import tiny_config

    mla = tiny_config(multi_latent_attention=True, kv_lora_rank=8, qk_head_dim=4, qk_pos_emb_head_dim=4,
                      v_head_dim=4, moe_layer_freq=(1, 0))
    with pytest.raises(ValueError, match="DeepSeek-V3") as err:
        check_exportable(mla)
    for problem in ("--qk-layernorm", "--moe-layer-freq (1, 0)", "--moe-router-score-function sigmoid",
                    "--moe-shared-expert-intermediate-size None"):
        assert problem in str(err.value), problem


def _train(rank, world, argv):
    import pretrain_moe

    os.environ["WORLD_SIZE"] = str(world)
    assert pretrain_moe.main(argv) == 0


def test_imported_deepseek_v3_trains_at_ep_2_with_use_checkpoint_args(tmp_path):
    """The README's recipe at toy size: import at EP 2; pretrain_moe.py takes the model from the
    checkpoint (--use-checkpoint-args), trains with its MTP loss logged, evaluates the main loss."""
    root = str(tmp_path / "hf")
    _save("q-lora-mtp", root)
    summary = convert(root, str(tmp_path / "ckpt"), from_format="hf", target_world_size=2,
                      target_expert_parallel_size=(2,), progress=None)
    flags = summary.lines()[-1]
    assert "--multi-latent-attention" in flags and "--mtp-num-layers 1" in flags and "--rotary-scaling-factor 4.0" in flags
    argv = ["--device", "cpu", "--mock-data", "--seq-length", str(SEQ), "--expert-model-parallel-size", "2",
            "--load", str(tmp_path / "ckpt"), "--finetune", "--use-checkpoint-args", "--train-iters", "2",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-interval", "2", "--eval-iters", "1",
            "--log-json", str(tmp_path / "log.jsonl")]
    run_distributed(_train, 2, argv, timeout=300)
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl") if line.strip()]
    train = [r for r in records if "split" not in r]
    assert [r["iteration"] for r in train] == [1, 2]
    assert all(math.isfinite(r["lm_loss"]) and math.isfinite(r["mtp_loss"]) for r in train)
    (evaluation,) = [r for r in records if r.get("split") == "valid"]
    assert math.isfinite(evaluation["lm_loss"]) and "mtp_loss" not in evaluation


# DeepSeek-V3's published config.json (its fp8 quantization_config left out: the bf16 copy).
PUBLISHED = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def test_deepseek_v3s_published_config_is_megatrons_deepseek_v3_recipe():
    from megamoe.checkpointing.hf.config import from_hf_config
    from megamoe.training.flops import active_parameters

    config = from_hf_config(PUBLISHED)
    flags = " ".join(config.training_flags())
    for expected in ("--num-layers 61", "--hidden-size 7168", "--ffn-hidden-size 18432", "--num-attention-heads 128",
                     "--multi-latent-attention", "--q-lora-rank 1536", "--kv-lora-rank 512", "--qk-layernorm",
                     "--rotary-scaling-factor 40.0", "--mscale-all-dim 1.0", "--max-position-embeddings 163840",
                     "--norm-epsilon 1e-06", "--num-experts 256", "--moe-layer-freq " + ",".join(["0"] * 3 + ["1"] * 58),
                     "--moe-router-topk 8", "--moe-ffn-hidden-size 2048", "--moe-shared-expert-intermediate-size 2048",
                     "--moe-router-score-function sigmoid", "--moe-router-enable-expert-bias",
                     "--moe-router-topk-scaling-factor 2.5", "--moe-router-num-groups 8", "--moe-router-group-topk 4",
                     "--moe-router-load-balancing-type seq_aux_loss", "--moe-aux-loss-coeff 0.001", "--swiglu",
                     "--disable-bias-linear", "--untie-embeddings-and-output-weights"):
        assert expected in flags, expected
    # Megatron's defaults already are DeepSeek-V3's head dims and YaRN context; MTP comes with the weights.
    assert (config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim) == (128, 64, 128)
    assert config.original_max_position_embeddings == 4096 and config.mscale == 1.0 and config.mtp_num_layers is None
    assert abs(active_parameters(config) - 36.6e9) < 0.05e9
    with pytest.raises(ValueError, match=re.escape("quantization_config (fp8 weights: dequantize them to bf16 first)")):
        from_hf_config({**PUBLISHED, "quantization_config": {"quant_method": "fp8"}})
