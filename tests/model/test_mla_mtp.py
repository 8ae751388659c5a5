"""Multi-latent attention, YaRN and multi-token prediction on one process: the flags' meanings and
one-line refusals, YaRN's frequencies against transformers' own, and MTP's loss against its
definition (the shifted labels through the shared output layer).  Logits parity with transformers'
DeepSeek-V3 is in tests/checkpointing/test_hf_deepseek_v3.py; the layouts in
tests/optim/test_layout_invariance.py."""

import re

import pytest
import torch
import torch.nn.functional as F

from megamoe.model.gpt import GPTModel
from megamoe.model.rope import RotaryEmbedding, yarn_inv_freq, yarn_mscale
from megamoe.parallel import state as ps
from megamoe.training.arguments import parse_config
from tests.fixtures import TINY_MOE, assert_config_error
from tests.tiny_moe import tiny_config

MLA = dict(multi_latent_attention=True, q_lora_rank=12, kv_lora_rank=10, qk_head_dim=6, qk_pos_emb_head_dim=4,
           v_head_dim=10, qk_layernorm=True)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--multi-latent-attention", "--group-query-attention", "--num-query-groups", "2"],
         "--multi-latent-attention has no --group-query-attention, --num-query-groups"),
        (["--kv-lora-rank", "16"], "--kv-lora-rank need --multi-latent-attention"),
        (["--q-lora-rank", "8", "--v-head-dim", "8"], "--q-lora-rank, --v-head-dim need --multi-latent-attention"),
        (["--mtp-loss-scaling-factor", "-0.1"], "--mtp-loss-scaling-factor must be >= 0, got -0.1"),
        (["--mtp-num-layers", "-1"], "--mtp-num-layers must be >= 0, got -1"),
        (["--multi-latent-attention", "--qk-pos-emb-head-dim", "5"], "--qk-pos-emb-head-dim must be even"),
        (["--rotary-scaling-factor", "4"], "--rotary-scaling-factor 4.0 needs --rope-type yarn"),
        (["--multi-latent-attention", "--position-embedding-type", "learned_absolute", "--max-position-embeddings",
          "16"], "--multi-latent-attention needs --position-embedding-type rope"),
    ],
)
def test_mla_and_mtp_mistakes_are_one_line_naming_the_flags(extra, message):
    assert_config_error(TINY_MOE + extra, 1, re.escape(message))


def test_mla_takes_megatron_defaults_and_yarn():
    model = parse_config(TINY_MOE + ["--multi-latent-attention"], world_size=1).model
    assert (model.kv_lora_rank, model.qk_head_dim, model.qk_pos_emb_head_dim, model.v_head_dim) == (32, 128, 64, 128)
    assert model.q_lora_rank is None and model.rope_type == "yarn" and model.mtp_num_layers is None
    assert parse_config(TINY_MOE, world_size=1).model.rope_type == "rope"


def test_yarn_frequencies_and_scale_are_transformers_own():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for factor, mscale, mscale_all_dim in ((40.0, 1.0, 1.0), (4.0, 0.7, 0.3), (8.0, 1.0, 0.0)):
        hf = transformers.DeepseekV3Config(
            hidden_size=64, num_attention_heads=4, qk_rope_head_dim=16, max_position_embeddings=int(4096 * factor),
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor,
                             "original_max_position_embeddings": 4096, "mscale": mscale,
                             "mscale_all_dim": mscale_all_dim, "beta_fast": 32, "beta_slow": 1})
        want, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
        config = tiny_config(**{**MLA, "qk_pos_emb_head_dim": 16}, rotary_scaling_factor=factor, mscale=mscale,
                             mscale_all_dim=mscale_all_dim)
        torch.testing.assert_close(yarn_inv_freq(16, 10000.0, config), want, rtol=1e-6, atol=0)
        if mscale_all_dim:  # transformers takes the ratio only when both are given, Megatron always
            assert RotaryEmbedding(16, config).scale == pytest.approx(attention_factor, rel=1e-12)
    plain, unscaled = tiny_config(), tiny_config(**{**MLA, "qk_pos_emb_head_dim": 8}, mscale_all_dim=1.0)
    assert unscaled.rope_type == "yarn" and yarn_mscale(1.0, 1.0) == 1.0
    torch.testing.assert_close(RotaryEmbedding(8, unscaled).cos_sin(16, torch.device("cpu"), torch.float32),
                               RotaryEmbedding(8, plain).cos_sin(16, torch.device("cpu"), torch.float32))


def _model(**fields) -> GPTModel:
    config = tiny_config(**fields)
    return GPTModel(config, ps.single_rank_layout(config.experts_by_layer())).initialize(5)


def test_mtp_loss_is_the_shifted_labels_through_the_shared_output_layer():
    model = _model(**MLA, mtp_num_layers=2, mtp_loss_scaling_factor=0.3)
    plain = _model(**MLA)  # the same main weights: parameters are drawn by name
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 200, (2, 16), generator=g), torch.randint(0, 200, (2, 16), generator=g)
    loss_mask = (torch.rand(2, 16, generator=g) > 0.2).float()
    out = model(tokens, labels, loss_mask)
    main = plain(tokens, labels, loss_mask)
    torch.testing.assert_close(out.lm_loss, main.lm_loss, rtol=0, atol=0)  # evaluation reports this one
    assert len(out.moe_stats) == len(main.moe_stats) + 2  # the MTP blocks are MoE like the last layer

    with torch.no_grad():  # the definition, depth by depth
        h = model.word_embeddings(tokens)
        for layer in model.layers:
            h, _ = layer(h)
        h = model.final_norm(h)
        want = []
        for k, depth in enumerate(model.mtp, start=1):
            e = model.word_embeddings(torch.cat([tokens[:, k:], tokens[:, :k]], dim=1))
            h, _ = depth(h, e)
            logits = F.linear(h[:, : 16 - k], model.word_embeddings.weight)[..., :200]
            per_token = F.cross_entropy(logits.flatten(0, 1), labels[:, k:].flatten(), reduction="none")
            mask = loss_mask[:, k:].flatten()
            want.append((per_token * mask).sum() / mask.sum())
    torch.testing.assert_close(out.mtp_loss, torch.stack(want).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + 0.3 * out.mtp_loss, rtol=1e-6, atol=0)
    assert model(tokens).logits.shape[-1] == plain(tokens).logits.shape[-1]  # no labels: the main logits only
