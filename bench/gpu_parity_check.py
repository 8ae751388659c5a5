"""One-off GPU check: a model at TP=1 on CUDA (NCCL) matches the same model at TP=2 on CPU (gloo).

    python bench/gpu_parity_check.py     # or python -m bench.gpu_parity_check

Both in fp32 with TF32 off; prints the max relative difference of the loss, the logits and every
gradient (gathered to full tensors), for a dense and an MoE GPT.  Not part of the test suite
(CI has no GPU); the CPU-only TP parity tests live in tests/model/test_tp_parity.py.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from megamoe.model.config import ModelConfig
from megamoe.model.gpt import GPTModel
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.gather import gather_full_state
from megamoe.parallel.launch import init_distributed, spawn_cpu_ranks
from megamoe.parallel.mappings import gather_from_tp_region
from megamoe.parallel.state import initialize_model_parallel

CONFIGS = {
    "dense": dict(num_experts=()),
    "moe": dict(num_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.01),
}


def _run(variant, parallel: ParallelConfig, device):
    cfg = ModelConfig(vocab_size=300, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                      max_position_embeddings=32, swiglu=True, add_bias_linear=False, **CONFIGS[variant])
    layout = initialize_model_parallel(parallel, cfg.experts_by_layer())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (2, 32), generator=g).to(device)
    labels = torch.randint(0, 300, (2, 32), generator=g).to(device)
    model = GPTModel(cfg, layout, device=device).initialize(seed=1234)
    out = model(tokens, labels)
    out.loss.backward()
    logits = gather_from_tp_region(model(tokens).logits, layout)[..., :300]
    grads = {k: v.cpu() for k, v in gather_full_state(model, model.layout, grads=True).items()}
    return {"loss": out.loss.detach().cpu(), "logits": logits.detach().cpu(), "grads": grads}


def _cpu_body(rank, world):
    return {v: _run(v, ParallelConfig(tensor_model_parallel_size=2), torch.device("cpu")) for v in CONFIGS}


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def main():
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = spawn_cpu_ranks(_cpu_body, 2)[0]
    init_distributed(torch.device("cuda"))
    for variant in CONFIGS:
        gpu = _run(variant, ParallelConfig(), torch.device("cuda"))
        ref = cpu[variant]
        worst = max(_rel(gpu["grads"][k], ref["grads"][k]) for k in ref["grads"])
        print(json.dumps({
            "variant": variant, "gpu": torch.cuda.get_device_name(),
            "loss_gpu_tp1": gpu["loss"].item(), "loss_cpu_tp2": ref["loss"].item(),
            "loss_rel": _rel(gpu["loss"], ref["loss"]), "logits_rel": _rel(gpu["logits"], ref["logits"]),
            "worst_grad_rel": worst,
        }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
