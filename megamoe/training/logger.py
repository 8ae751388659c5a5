"""Where the training metrics go: the console line, --log-json, wandb, tensorboard.

One record per log step, a dict with these stable snake_case keys (``None`` where a value does
not apply, e.g. ``mfu`` on CPU without --peak-tflops-per-device, or ``grad_norm`` of a step
skipped for fp16 overflow):

    iteration, consumed_samples, lm_loss, aux_loss, z_loss, mtp_loss, grad_norm, grad_norm_inf, lr,
    loss_scale, skipped_iters, tokens_per_sec, tflops_per_device, mfu, max_memory_gib,
    expert_tokens_min, expert_tokens_max, expert_load_imbalance, dropped_fraction, elapsed_ms_per_iter

``mtp_loss`` (with --mtp-num-layers) is the MTP depths' mean cross entropy, before
--mtp-loss-scaling-factor.  Evaluation records have ``{"iteration", "split": "valid", "lm_loss",
"ppl"}``: the main model's LM loss, without MTP.  With --log-num-zeros-in-grad records have
``num_zeros_in_grad``, with --log-params-norm ``params_norm``, with --log-sample-ids ``sample_ids``
(the dataset indices of the interval's global batches, in order; --log-json only).  Only rank 0
writes.

The console line shows the throughput (tokens/s, TFLOP/s per device, MFU) with --log-throughput;
tensorboard and wandb get the iteration time with --log-timers-to-tensorboard (and the
throughput when --log-throughput is on too), the memory with --log-memory-to-tensorboard and
the validation perplexity with --log-validation-ppl-to-tensorboard, as Megatron writes them.
The --log-json record always has every key.
"""

from __future__ import annotations

import json
import math
import os

RECORD_KEYS = (
    "iteration", "consumed_samples", "lm_loss", "aux_loss", "z_loss", "mtp_loss", "grad_norm", "grad_norm_inf", "lr",
    "loss_scale", "skipped_iters", "tokens_per_sec", "tflops_per_device", "mfu", "max_memory_gib",
    "expert_tokens_min", "expert_tokens_max", "expert_load_imbalance", "dropped_fraction", "elapsed_ms_per_iter",
)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


TIMER_KEYS = ("elapsed_ms_per_iter",)
THROUGHPUT_KEYS = ("tokens_per_sec", "tflops_per_device", "mfu")
MEMORY_KEYS = ("max_memory_gib",)


def dashboard_keys_left_out(logging_config) -> set[str]:
    """The record keys tensorboard and wandb do not get, by the --log-*-to-tensorboard flags."""
    cfg = logging_config
    left_out = set()
    if not cfg.log_timers_to_tensorboard:
        left_out.update(TIMER_KEYS)
    if not (cfg.log_timers_to_tensorboard and cfg.log_throughput):
        left_out.update(THROUGHPUT_KEYS)
    if not cfg.log_memory_to_tensorboard:
        left_out.update(MEMORY_KEYS)
    if not cfg.log_validation_ppl_to_tensorboard:
        left_out.add("ppl")
    return left_out


def format_line(record: dict, train_iters: int, *, throughput: bool = True) -> str:
    r = record
    parts = [
        f"iter {r['iteration']:>6d}/{train_iters}",
        f"samples {r['consumed_samples']}",
        f"lm loss {_fmt(r['lm_loss'], '.4f')}",
    ]
    if r.get("aux_loss") is not None:
        parts.append(f"aux {_fmt(r['aux_loss'], '.4f')}")
    if r.get("z_loss") is not None:
        parts.append(f"z {_fmt(r['z_loss'], '.4f')}")
    if r.get("mtp_loss") is not None:
        parts.append(f"mtp {_fmt(r['mtp_loss'], '.4f')}")
    parts += [
        f"grad norm {_fmt(r['grad_norm'], '.4f')}",
        *([f"params norm {_fmt(r['params_norm'], '.4f')}"] if r.get("params_norm") is not None else []),
        *([f"zeros in grad {r['num_zeros_in_grad']}"] if r.get("num_zeros_in_grad") is not None else []),
        f"lr {_fmt(r['lr'], '.3e')}",
        f"loss scale {_fmt(r['loss_scale'], 'g')}",
        f"skipped {r['skipped_iters']}",
        f"{_fmt(r['elapsed_ms_per_iter'], '.1f')} ms/iter",
    ]
    if throughput:
        parts += [
            f"{_fmt(r['tokens_per_sec'], ',.0f')} tok/s",
            f"{_fmt(r['tflops_per_device'], '.2f')} TFLOP/s/dev",
            "MFU n/a" if r["mfu"] is None else f"MFU {100 * r['mfu']:.1f}%",
        ]
    parts.append(f"mem {_fmt(r['max_memory_gib'], '.2f')} GiB")
    if r.get("expert_tokens_max") is not None:
        parts.append(
            f"experts min/max {_fmt(r['expert_tokens_min'], '.0f')}/{_fmt(r['expert_tokens_max'], '.0f')}"
            f" (x{_fmt(r['expert_load_imbalance'], '.2f')})"
        )
    return " | ".join(parts)


class TrainingLogger:
    def __init__(self, logging_config, *, rank: int, run_config_dict: dict, train_iters: int) -> None:
        self.active = rank == 0
        self.cfg = logging_config
        self.train_iters = train_iters
        self.json_file = None
        self.wandb = None
        self.tensorboard = None
        if not self.active:
            return
        if logging_config.log_json:
            self.json_file = open(logging_config.log_json, "a")
        if logging_config.wandb_project:
            self._start_wandb(run_config_dict)
        if logging_config.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=logging_config.tensorboard_dir)

    def _start_wandb(self, run_config_dict: dict) -> None:
        import wandb

        # Offline unless a key is configured: never block a run on a login prompt, never print the key.
        mode = self.cfg.wandb_mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.wandb = wandb.init(
            project=self.cfg.wandb_project,
            name=self.cfg.wandb_exp_name,
            dir=self.cfg.wandb_save_dir,
            mode=mode,
            config=run_config_dict,
        )
        print(f"wandb: logging to project {self.cfg.wandb_project!r} in {mode} mode", flush=True)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        print(format_line(record, self.train_iters, throughput=self.cfg.log_throughput), flush=True)
        self._write(record, prefix="train")

    def log_eval(self, record: dict) -> None:
        if not self.active:
            return
        print(
            f"eval at iter {record['iteration']} | {record['split']} lm loss {record['lm_loss']:.4f} | "
            f"ppl {record['ppl']:.2f}",
            flush=True,
        )
        self._write(record, prefix=record["split"])

    def info(self, message: str) -> None:
        if self.active:
            print(message, flush=True)

    def _write(self, record: dict, *, prefix: str) -> None:
        if self.json_file is not None:
            # A skipped (overflowed) step has a non-finite norm: strict JSON has no NaN/Infinity.
            strict = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            self.json_file.write(json.dumps(strict, allow_nan=False) + "\n")
            self.json_file.flush()
        left_out = dashboard_keys_left_out(self.cfg) | {"iteration"}
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in left_out}
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in numeric.items()}, step=record["iteration"])
        if self.tensorboard is not None:
            for key, value in numeric.items():
                self.tensorboard.add_scalar(f"{prefix}/{key}", value, record["iteration"])

    def close(self) -> None:
        if self.json_file is not None:
            self.json_file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
