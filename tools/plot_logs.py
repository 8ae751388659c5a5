"""Plot loss and grad-norm curves of one or several --log-json files into one PNG.

    python tools/plot_logs.py runs/ep1/log.jsonl runs/ep4/log.jsonl --out compare.png

Each file becomes one line per panel, labelled by its path (or --labels).  Panels: lm_loss,
grad_norm, and the validation loss when the logs hold eval records.
"""

from __future__ import annotations

import argparse
import json
import sys


def read_log(path: str) -> tuple[list[dict], list[dict]]:
    train, valid = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise SystemExit(f"plot_logs.py: error: {path}:{number} is not a JSON line") from None
            (valid if record.get("split") == "valid" else train).append(record)
    if not train:
        raise SystemExit(f"plot_logs.py: error: {path} holds no training records")
    return train, valid


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", help="--log-json files")
    parser.add_argument("--out", default="curves.png")
    parser.add_argument("--labels", nargs="*", default=None)
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.logs):
        parser.error(f"--labels got {len(args.labels)} labels for {len(args.logs)} logs")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_logs.py: error: needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    runs = [read_log(path) for path in args.logs]
    has_valid = any(valid for _, valid in runs)
    panels = ["lm_loss", "grad_norm"] + (["valid lm_loss"] if has_valid else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for (train, valid), label in zip(runs, args.labels or args.logs):
        its = [r["iteration"] for r in train]
        axes[0].plot(its, [r["lm_loss"] for r in train], label=label)
        axes[1].plot(its, [r["grad_norm"] for r in train], label=label)
        if has_valid and valid:
            axes[2].plot([r["iteration"] for r in valid], [r["lm_loss"] for r in valid], marker="o", label=label)
    for ax, title in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize="small")
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
