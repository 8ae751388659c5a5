"""Checkpoint conversion: wall time, throughput and peak memory of each conversion, next to the
size of the whole state and of its largest streamed group.

    python bench/bench_convert.py                       # ~31M parameters, 8 MoE layers
    python bench/bench_convert.py --layers 16 --hidden 512 --experts 8 --keep /tmp/ckpts

Builds a synthetic checkpoint (random weights and Adam state; world 2, EP 2, ZeRO-1) with the
converter's own writer, then runs tools/convert_checkpoint.py in a fresh process for:
reshard (-> world 8, TP 2, EP 4, no ZeRO-1), consolidate, HF export, HF import.  For each it
prints wall seconds, MiB/s of full state, and the child's peak memory two ways: anonymous memory
(RssAnon: what streaming bounds) and RSS (which also counts the memory-mapped checkpoint pages,
reclaimable page cache), both sampled from /proc every 10 ms.  Streaming works when the peak
anonymous memory tracks the largest group, not the whole state.
"""

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch

from megamoe.checkpointing.convert.full_state import PARAM, FullStateInfo, stream_groups
from megamoe.checkpointing.convert.sharded_writer import ShardedWriter
from megamoe.checkpointing.convert.target import target_topology
from megamoe.checkpointing.format import model_config_dict
from megamoe.checkpointing.param_specs import model_specs
from megamoe.model.config import ModelConfig
from megamoe.optim.state_dict import OPTIMIZER_KINDS

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "convert_checkpoint.py")


def build_source(root: str, config: ModelConfig) -> tuple[int, int]:
    """Write a synthetic world-2, EP-2, ZeRO-1 checkpoint; return (full-state bytes, largest group bytes)."""
    specs = model_specs(config, torch.float32)
    rng = {
        "python": random.getstate(),
        "torch_cpu": torch.get_rng_state(),
        "tracker": {"model-parallel": torch.get_rng_state()},
    }
    info = FullStateInfo(
        model_config=model_config_dict(config),
        specs=specs,
        iteration=100,
        consumed_samples=800,
        args={"seed": 1},
        optimizer={
            "adam_steps": 100,
            "num_skipped": 0,
            "lr": 1e-4,
            "loss_scaler": {"scale": 1.0, "clean_steps": 0, "overflows_left": 2},
            "bucket_size": None,
        },
        rng=[[rng], [rng]],
        source_topology=None,
    )
    topology = target_topology(
        config,
        world_size=2,
        tensor_model_parallel_size=1,
        expert_model_parallel_size=(2,),
        use_distributed_optimizer=True,
    )
    writer = ShardedWriter(root, info, topology)
    total = largest = 0
    for _, names in stream_groups(list(specs)):
        group = {}
        for name in names:
            master = torch.randn(specs[name].shape) * 0.02
            group[name] = {
                PARAM: master.to(specs[name].dtype),
                "master": master,
                "exp_avg": torch.randn_like(master) * 1e-3,
                "exp_avg_sq": torch.rand_like(master) * 1e-6,
            }
        size = sum(
            t.numel() * t.element_size()
            for state in group.values()
            for t in (state[PARAM], *[state[k] for k in OPTIMIZER_KINDS])
        )
        total, largest = total + size, max(largest, size)
        writer.write(group)
    writer.finish()
    return total, largest


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


BASELINE = (
    "import time; import megamoe.checkpointing.convert.run, megamoe.model.gpt; time.sleep(1)"
)


def run_tool(args: list[str], command: list[str] | None = None) -> tuple[float, int, int]:
    """Run the tool (or ``command``); return (seconds, peak RssAnon MiB, peak RSS MiB), sampled
    from /proc every 10 ms (VmHWM: the kernel's high-water mark of this program's RSS)."""
    start = time.perf_counter()
    command = command or [sys.executable, TOOL, "--quiet", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = {"RssAnon": 0, "VmHWM": 0}

    def sample():
        while proc.poll() is None:
            for key in peak:
                peak[key] = max(peak[key], _status_kib(proc.pid, key))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"bench_convert.py: {' '.join(args)} failed:\n{err.decode()}")
    return seconds, peak["RssAnon"] // 1024, peak["VmHWM"] // 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--moe-ffn", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--keep", default=None, help="directory to keep the checkpoints in (default: a temporary one)")
    args = p.parse_args()
    config = ModelConfig(
        vocab_size=args.vocab,
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=8,
        ffn_hidden_size=args.moe_ffn,
        max_position_embeddings=2048,
        num_experts=args.experts,
        moe_ffn_hidden_size=args.moe_ffn,
        untie_embeddings_and_output_weights=True,
        swiglu=True,
        add_bias_linear=False,
    )
    work = args.keep or tempfile.mkdtemp(prefix="bench_convert_")
    try:
        src = os.path.join(work, "src")
        shutil.rmtree(src, ignore_errors=True)
        start = time.perf_counter()
        total, largest = build_source(src, config)
        params = total // 16  # four fp32 tensors per parameter element
        print(
            f"model: {args.layers} MoE layers, hidden {args.hidden}, {args.experts} experts of ffn {args.moe_ffn}, "
            f"vocab {args.vocab}: {params / 1e6:.1f}M parameters"
        )
        print(
            f"full state (fp32 weights + master + Adam m, v): {total / 2**20:.0f} MiB; "
            f"largest group {largest / 2**20:.0f} MiB; "
            f"source written in {time.perf_counter() - start:.1f} s (world 2, EP 2, ZeRO-1)"
        )
        runs = [
            (
                "reshard -> world 8, TP 2, EP 4, no ZeRO-1",
                [
                    "--load-dir",
                    src,
                    "--save-dir",
                    os.path.join(work, "resharded"),
                    "--target-world-size",
                    "8",
                    "--target-tensor-parallel-size",
                    "2",
                    "--target-expert-parallel-size",
                    "4",
                    "--no-target-use-distributed-optimizer",
                ],
                total,
            ),
            (
                "consolidate",
                ["--load-dir", src, "--save-dir", os.path.join(work, "full"), "--to", "consolidated"],
                total,
            ),
            (
                "export to Hugging Face",
                ["--load-dir", src, "--save-dir", os.path.join(work, "hf"), "--to", "hf"],
                total,
            ),
            (
                "import from Hugging Face (world 2, TP 2)",
                [
                    "--from",
                    "hf",
                    "--load-dir",
                    os.path.join(work, "hf"),
                    "--save-dir",
                    os.path.join(work, "from_hf"),
                    "--target-world-size",
                    "2",
                    "--target-tensor-parallel-size",
                    "2",
                ],
                total // 4,
            ),
        ]
        print(f"{'conversion':44s} {'seconds':>8s} {'MiB/s':>7s} {'peak anon MiB':>14s} {'peak RSS MiB':>12s}")
        _, anon, maxrss = run_tool([], [sys.executable, "-c", BASELINE])
        print(f"{'(baseline: python + torch + megamoe imports)':44s} {'':8s} {'':7s} {anon:14d} {maxrss:12d}")
        for label, tool_args, size in runs:
            shutil.rmtree(tool_args[tool_args.index("--save-dir") + 1], ignore_errors=True)
            seconds, anon, maxrss = run_tool(tool_args + ["--force"])
            print(f"{label:44s} {seconds:8.1f} {size / 2**20 / seconds:7.0f} {anon:14d} {maxrss:12d}")
        print(
            "(each conversion reads the source, writes the target, then reads the target back to verify it; "
            "the MiB/s count the full state once)"
        )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
