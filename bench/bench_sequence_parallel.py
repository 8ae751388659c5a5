"""What sequence parallelism and expert-TP folding save, per rank and MoE layer, on 4 CPU ranks.

    python bench/bench_sequence_parallel.py                 # TP 2 x DP 2, 2 MoE layers, 4 experts, top-2
    python bench/bench_sequence_parallel.py --seq 64 --hidden 128

Three layouts of the same model and tokens: TP 2 without ``--sequence-parallel`` (EP 2, experts
sharded over TP), TP 2 with it (EP 2, ETP 2), and TP 2 with it and ETP 1 (EP 4 over TP x DP).
One forward (fp32) of one micro-batch ``[b, s]`` per DP rank; printed per rank and MoE layer:

* ``dispatch``: bytes of token rows this rank sends to other ranks of its EP group in the
  dispatch all-to-all, recorded by wrapping ``torch.distributed.all_to_all_single``, and
  ``dispatch_analytic``: the same from the routing alone, (token-slots this rank routes to an
  expert held by another EP rank) x h x 4 B.  Without sequence parallelism every TP rank routes
  all ``b * s`` tokens; with it each routes its own ``b * s / TP``, so it falls by TP.
* ``a2a_fwd``: dispatch plus combine (which returns the rows this rank received; the backward
  sends the same again), and ``a2a_uniform``: its expectation for uniform routing,
  2 x T x k x (EP - 1) / EP x h x 4 B, T the tokens this rank routes.
* ``saved``: bytes of the distinct tensors autograd saves for backward in that transformer layer
  (attention, norms, residuals and the MoE block).
* ``saved_bsh``: of those, the ones shaped like the layer's input (norm inputs, residuals,
  dropout-free activations of the residual stream), and ``bsh_analytic`` = their count x
  b x s x h x 4 B / (TP with sequence parallelism, else 1).

Nothing is timed: the numbers are exact counts for these shapes.
"""

import argparse

import torch
import torch.distributed as dist

from megamoe.model.config import ModelConfig
from megamoe.model.gpt import GPTModel
from megamoe.model.moe.router import TopKRouter
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.launch import spawn_cpu_ranks
from megamoe.parallel.state import initialize_model_parallel

WORLD, TP = 4, 2
# (name, sequence parallel, ETP (None: TP), EP)
LAYOUTS = [("TP2", False, None, 2), ("TP2+SP", True, None, 2), ("TP2+SP+ETP1", True, 1, 4)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--topk", type=int, default=2)
    return p.parse_args(argv)


def _config(args) -> ModelConfig:
    return ModelConfig(
        vocab_size=256, num_layers=2, hidden_size=args.hidden, num_attention_heads=4, ffn_hidden_size=2 * args.hidden,
        max_position_embeddings=args.seq, num_experts=args.experts, moe_router_topk=args.topk,
        moe_ffn_hidden_size=2 * args.hidden, swiglu=True,
    )


def _measure(args, layout, ep: int, tokens: torch.Tensor) -> list[dict]:
    model = GPTModel(_config(args), layout).initialize(seed=1)
    groups = layout.experts(ep)
    current = {"layer": None}
    per_layer = {i: {"sends": [], "dispatch_analytic": 0, "saved": {}, "bsh": {}, "shape": None}
                 for i, layer in enumerate(model.layers) if layer.is_moe}
    handles = []
    for index, layer in enumerate(model.layers):
        def pre_hook(module, inputs, index=index):
            current["layer"] = index
            if index in per_layer:
                per_layer[index]["shape"] = tuple(inputs[0].shape)
        handles.append(layer.register_forward_pre_hook(pre_hook))
        handles.append(layer.register_forward_hook(lambda *_: current.update(layer=None)))

    def routed(module, inputs, routing):
        record = per_layer[current["layer"]]
        local = args.experts // ep
        off_rank = (torch.div(routing.expert_ids, local, rounding_mode="floor") != groups.ep_rank).sum().item()
        record["dispatch_analytic"] += off_rank * args.hidden * 4
        record["tokens"] = routing.expert_ids.shape[0]
    for module in model.modules():
        if isinstance(module, TopKRouter):
            handles.append(module.register_forward_hook(routed))

    real_all_to_all = dist.all_to_all_single

    def recording_all_to_all(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
        if group is groups.ep_group and input_split_sizes is not None and current["layer"] in per_layer:
            row_bytes = input[0].numel() * input.element_size()
            me = dist.get_rank(group)
            per_layer[current["layer"]]["sends"].append(
                row_bytes * sum(n for r, n in enumerate(input_split_sizes) if r != me)
            )
        return real_all_to_all(output, input, output_split_sizes, input_split_sizes, group=group, **kw)

    def pack(t):
        index = current["layer"]
        if index in per_layer:
            key = t.untyped_storage().data_ptr()
            per_layer[index]["saved"][key] = t.untyped_storage().nbytes()
            if tuple(t.shape) == per_layer[index]["shape"]:
                per_layer[index]["bsh"][key] = t.untyped_storage().nbytes()
        return t

    dist.all_to_all_single = recording_all_to_all
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens, tokens)
    finally:
        dist.all_to_all_single = real_all_to_all
        for h in handles:
            h.remove()
    split = TP if layout.sequence_parallel else 1
    out = []
    for index, rec in per_layer.items():
        bsh_count = len(rec["bsh"])
        out.append({
            "layer": index,
            "dispatch": rec["sends"][0] if rec["sends"] else 0,
            "dispatch_analytic": rec["dispatch_analytic"],
            "a2a_fwd": sum(rec["sends"]),
            "a2a_uniform": round(2 * rec["tokens"] * args.topk * (ep - 1) / ep * args.hidden * 4),
            "saved": sum(rec["saved"].values()),
            "saved_bsh": sum(rec["bsh"].values()),
            "bsh_analytic": bsh_count * args.batch * args.seq * args.hidden * 4 // split,
        })
    return out


def _body(rank, world, args):
    results = {}
    for name, sp, etp, ep in LAYOUTS:
        parallel = ParallelConfig(tensor_model_parallel_size=TP, expert_model_parallel_size=(ep,),
                                  expert_tensor_parallel_size=etp, sequence_parallel=sp)
        layout = initialize_model_parallel(parallel, _config(args).experts_by_layer())
        g = torch.Generator().manual_seed(100 + layout.dp_rank)  # each DP rank its own micro-batch
        tokens = torch.randint(0, 256, (args.batch, args.seq), generator=g)
        results[name] = _measure(args, layout, ep, tokens)
    return results


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    per_rank = spawn_cpu_ranks(_body, WORLD, args)
    print(f"{WORLD} CPU ranks, TP {TP}; micro-batch [{args.batch}, {args.seq}] per DP rank, hidden {args.hidden}, "
          f"{args.experts} experts, top-{args.topk}, fp32; forward bytes per rank per MoE layer")
    header = ("layout", "rank", "layer", "dispatch", "dispatch_analytic", "a2a_fwd", "a2a_uniform", "saved", "saved_bsh",
              "bsh_analytic")
    print("  ".join(f"{h:>17}" for h in header))
    rows = []
    for name, *_ in LAYOUTS:
        for rank, results in enumerate(per_rank):
            for rec in results[name]:
                row = {"layout": name, "rank": rank, **rec}
                rows.append(row)
                print("  ".join(f"{row[h]:>17}" for h in header))
    return rows


if __name__ == "__main__":
    main()
