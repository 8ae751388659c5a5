"""Hugging Face export and import of a trained megamoe checkpoint (Mixtral-shaped):
transformers' MixtralForCausalLM on the export computes megamoe's logits, the import gives back
the original weights and configuration, and options without a Mixtral equivalent are refused by
name."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from megamoe.checkpointing.convert.run import convert
from megamoe.checkpointing.format import CheckpointError
from megamoe.checkpointing.hf.config import check_exportable
from megamoe.data.tokenizer_training import train_sentencepiece
from megamoe.model.config import ModelConfig

transformers = pytest.importorskip("transformers")

TEXTS = ["def f(x):\n    return x + 1", "the quick brown fox", "héllo wörld ✓", "a\n\nb"]


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    docs = ["def f(x):\n    return x + 1\n" * 3, "the quick brown fox jumps over the lazy dog " * 5]
    return train_sentencepiece(
        docs, model_prefix=str(tmp_path_factory.mktemp("tok") / "spm"), vocab_size=300, character_coverage=0.98
    )


@pytest.fixture(scope="module")
def exported(trained, tokenizer_model, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf") / "export")
    summary = convert(trained.root, root, to="hf", tokenizer_model=tokenizer_model, progress=None)
    return root, summary


def _consolidated_weights(root: str) -> dict[str, torch.Tensor]:
    meta = json.load(open(os.path.join(root, "metadata.json")))
    out = {}
    for group in meta["groups"]:
        tensors = load_file(os.path.join(root, group["file"]))
        out.update({k[len("param/") :]: v for k, v in tensors.items() if k.startswith("param/")})
    return out


def test_transformers_mixtral_computes_megamoe_logits(trained, exported):
    root, summary = exported
    model = transformers.MixtralForCausalLM.from_pretrained(root, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(trained.tokens).logits
    torch.testing.assert_close(logits, trained.logits, rtol=1e-4, atol=1e-4)
    assert summary.target_full.count == 17  # weights only: every megamoe parameter, each once
    assert summary.not_exported and "optimizer state (51 full tensors" in summary.not_exported[0]


def test_export_files(exported, tokenizer_model):
    root, _ = exported
    config = json.load(open(os.path.join(root, "config.json")))
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    assert config["tie_word_embeddings"] is False and config["num_key_value_heads"] == config["num_attention_heads"]
    index = json.load(open(os.path.join(root, "model.safetensors.index.json")))
    # 2 layers x 4 experts x (w1, w2, w3), q/k/v/o, gate, 2 norms per layer; embeddings, norm, head.
    assert len(index["weight_map"]) == 2 * (4 * 3 + 4 + 1 + 2) + 3
    assert open(os.path.join(root, "tokenizer.model"), "rb").read() == open(tokenizer_model, "rb").read()


def test_exported_tokenizer_encodes_like_sentencepiece(exported, tokenizer_model):
    pytest.importorskip("google.protobuf")  # transformers converts sentencepiece models with protobuf
    import sentencepiece as spm

    root, _ = exported
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    tok = transformers.AutoTokenizer.from_pretrained(root)
    for text in TEXTS:
        assert tok.encode(text) == sp.encode(text), text
    config = json.load(open(os.path.join(root, "config.json")))
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        sp.bos_id(),
        sp.eos_id(),
        sp.pad_id(),
    )


def test_import_of_the_export_equals_the_original(trained, exported, tmp_path):
    root, _ = exported
    imported = str(tmp_path / "imported")
    convert(
        root,
        imported,
        from_format="hf",
        target_world_size=2,
        target_tensor_parallel_size=2,
        target_expert_parallel_size=(1,),
        progress=None,
    )
    original_full, imported_full = str(tmp_path / "original_full"), str(tmp_path / "imported_full")
    convert(trained.root, original_full, to="consolidated", progress=None)
    convert(imported, imported_full, to="consolidated", progress=None)
    want, got = _consolidated_weights(original_full), _consolidated_weights(imported_full)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    meta = {
        p: json.load(open(os.path.join(p, "metadata.json")))["model_config"] for p in (original_full, imported_full)
    }
    assert meta[imported_full] == meta[original_full]


def test_import_refuses_what_megamoe_cannot_express(exported, tmp_path):
    root, _ = exported
    copy = tmp_path / "sliding"
    copy.mkdir()
    for name in os.listdir(root):
        os.symlink(os.path.join(root, name), copy / name)
    config = json.load(open(os.path.join(root, "config.json")))
    os.remove(copy / "config.json")
    json.dump(dict(config, sliding_window=8), open(copy / "config.json", "w"))
    with pytest.raises(CheckpointError, match=re.escape(str(copy / "config.json")) + ".*sliding-window attention"):
        convert(str(copy), str(tmp_path / "dst"), from_format="hf", progress=None)


def test_import_names_a_missing_weight_file(exported, tmp_path):
    root, _ = exported
    copy = tmp_path / "partial"
    copy.mkdir()
    for name in os.listdir(root):
        if name != "model-00002-of-00005.safetensors":
            os.symlink(os.path.join(root, name), copy / name)
    with pytest.raises(
        CheckpointError, match=re.escape(str(copy / "model-00002-of-00005.safetensors")) + " is missing"
    ):
        convert(str(copy), str(tmp_path / "dst"), from_format="hf", progress=None)


def test_export_refuses_options_without_a_mixtral_equivalent():
    config = ModelConfig(
        vocab_size=64,
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        normalization="LayerNorm",
        position_embedding_type="learned_absolute",
        max_position_embeddings=128,
        swiglu=False,
        add_bias_linear=True,
        num_experts=(4, 8),
        moe_layer_freq=(1, 1),
        moe_shared_expert_intermediate_size=16,
        moe_expert_capacity_factor=1.25,
        moe_router_pre_softmax=True,
    )
    with pytest.raises(ValueError) as err:
        check_exportable(config)
    for flag in (
        "--normalization LayerNorm",
        "--position-embedding-type learned_absolute",
        "--swiglu",
        "--disable-bias-linear",
        "--num-experts [4, 8]",
        "--moe-shared-expert-intermediate-size",
        "--moe-expert-capacity-factor 1.25",
        "--moe-router-pre-softmax",
    ):
        assert flag in str(err.value), flag
    dense_every_other = ModelConfig(
        vocab_size=64, num_layers=2, hidden_size=32, num_attention_heads=4, num_experts=4, moe_layer_freq=2,
        swiglu=True, add_bias_linear=False,
    )
    with pytest.raises(ValueError, match=r"--moe-layer-freq 2: MoE layers \[0\] of 2"):
        check_exportable(dense_every_other)
    with pytest.raises(ValueError, match="a dense model"):
        check_exportable(ModelConfig(vocab_size=64))
