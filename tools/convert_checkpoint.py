"""Convert megamoe checkpoints: reshard to another layout, consolidate, export to / import from
Hugging Face Mixtral or Qwen3-MoE.  Runs on CPU, one layer at a time.

    # reshard (PP, TP, EP per MoE layer, world size, ZeRO-1; optimizer state included)
    python tools/convert_checkpoint.py --load-dir ckpt/run1 --save-dir ckpt/run1_tp2_ep4 \
        --target-tensor-parallel-size 2 --target-expert-parallel-size 4 --target-world-size 8 \
        --target-use-distributed-optimizer

    # consolidate to one layout-free copy, and back to any layout
    python tools/convert_checkpoint.py --load-dir ckpt/run1 --save-dir ckpt/run1_full --to consolidated
    python tools/convert_checkpoint.py --load-dir ckpt/run1_full --save-dir ckpt/run1_w4 --target-world-size 4

    # export to Hugging Face (weights, config.json, tokenizer) and import back at any layout
    python tools/convert_checkpoint.py --load-dir ckpt/run1 --save-dir hf/run1 --to hf \
        --tokenizer-model cache/default_corpus/tokenizer.model
    python tools/convert_checkpoint.py --from hf --load-dir hf/run1 --save-dir ckpt/from_hf \
        --target-tensor-parallel-size 2 --target-world-size 2

Prints one progress line per layer and a summary proving every source tensor was accounted for
(counts, and a checksum of the full tensors read from the source and read back from the target).
Exit status 1 with a one-line error for a broken source or an impossible request.
"""

from __future__ import annotations

import argparse
import sys

from megamoe.checkpointing.convert.run import TARGETS, convert
from megamoe.int_list import IntListAction


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--load-dir",
        required=True,
        help="source: a megamoe save root (or one iter_ directory), "
        "a consolidated checkpoint, or a Hugging Face directory with --from hf",
    )
    p.add_argument("--save-dir", required=True, help="target directory (must not exist or be empty, unless --force)")
    p.add_argument("--to", choices=TARGETS, default="megamoe", help="target format (default: megamoe)")
    p.add_argument(
        "--from",
        dest="from_format",
        choices=["hf"],
        default=None,
        help="source format when it is not megamoe's (detected otherwise)",
    )
    p.add_argument(
        "--target-tensor-parallel-size", type=int, default=None, help="default: the source's (layout-free: 1)"
    )
    p.add_argument(
        "--target-expert-parallel-size",
        action=IntListAction,
        minimum=1,
        default=None,
        help="one value, or one per MoE layer, space- or comma-separated (default: the source's)",
    )
    p.add_argument(
        "--target-expert-tensor-parallel-size",
        type=int,
        default=None,
        help="ranks that split each expert (default: the source's, or the target TP when that is given); "
        "other than the target TP, the target trains with --sequence-parallel",
    )
    p.add_argument(
        "--target-pipeline-model-parallel-size", type=int, default=None,
        help="pipeline stages of the target layout (default: the source's, layout-free: 1); with TP, EP and ETP "
        "it must divide --target-world-size",
    )
    p.add_argument("--target-world-size", type=int, default=None, help="default: the source's (layout-free: 1)")
    zero = p.add_mutually_exclusive_group()
    zero.add_argument(
        "--target-use-distributed-optimizer",
        dest="zero",
        action="store_true",
        default=None,
        help="shard the optimizer state ZeRO-1 style (default: as the source)",
    )
    zero.add_argument("--no-target-use-distributed-optimizer", dest="zero", action="store_false")
    p.add_argument("--tokenizer-model", default=None, help="with --to hf: sentencepiece .model copied into the export")
    p.add_argument("--force", action="store_true", help="replace a non-empty --save-dir")
    p.add_argument("--quiet", action="store_true", help="no progress lines (the summary is still printed)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value in (
        ("--target-tensor-parallel-size", args.target_tensor_parallel_size),
        ("--target-world-size", args.target_world_size),
        ("--target-expert-tensor-parallel-size", args.target_expert_tensor_parallel_size),
        ("--target-pipeline-model-parallel-size", args.target_pipeline_model_parallel_size),
    ):
        if value is not None and value < 1:
            print(f"convert_checkpoint.py: error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    try:
        summary = convert(
            args.load_dir,
            args.save_dir,
            to=args.to,
            from_format=args.from_format,
            target_world_size=args.target_world_size,
            target_tensor_parallel_size=args.target_tensor_parallel_size,
            target_expert_parallel_size=(
                None if args.target_expert_parallel_size is None else tuple(args.target_expert_parallel_size)
            ),
            target_use_distributed_optimizer=args.zero,
            target_expert_tensor_parallel_size=args.target_expert_tensor_parallel_size,
            target_pipeline_model_parallel_size=args.target_pipeline_model_parallel_size,
            tokenizer_model=args.tokenizer_model,
            force=args.force,
            progress=None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True)),
        )
    except ValueError as err:  # CheckpointError is a ValueError: a user's input, not a bug
        print(f"convert_checkpoint.py: error: {err}", file=sys.stderr)
        return 1
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
