"""Logging side channels: wandb runs offline without an API key, tools/plot_logs.py draws curves."""

import json
import os
import subprocess
import sys

import pytest

from tests.fixtures import REPO, TINY_MOE, run_main
from tests.harness import run_distributed


def test_wandb_logs_offline_without_api_key(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    argv = TINY_MOE + ["--train-iters", "2", "--wandb-project", "megamoe-test", "--wandb-exp-name", "t",
                       "--wandb-save-dir", str(tmp_path)]
    run_distributed(run_main, 1, [argv], timeout=300)
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1, os.listdir(tmp_path / "wandb")


def test_plot_logs_draws_a_png_and_rejects_bad_lines(tmp_path):
    log = tmp_path / "a.jsonl"
    records = [{"iteration": i, "lm_loss": 5.0 - 0.1 * i, "grad_norm": 1.0 / i} for i in range(1, 6)]
    records.append({"iteration": 5, "split": "valid", "lm_loss": 4.6, "ppl": 99.5})
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "curves.png"
    done = subprocess.run([sys.executable, "tools/plot_logs.py", str(log), str(log), "--labels", "x", "y",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"iteration": 1}\nnot json\n')
    done = subprocess.run([sys.executable, "tools/plot_logs.py", str(bad)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and f"{bad}:2 is not a JSON line" in done.stderr


def test_tensorboard_receives_the_training_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = TINY_MOE + ["--train-iters", "3", "--tensorboard-dir", str(tmp_path / "tb")]
    run_distributed(run_main, 1, [argv], timeout=300)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    losses = events.Scalars("train/lm_loss")
    assert [e.step for e in losses] == [1, 2, 3]
    assert "train/grad_norm" in events.Tags()["scalars"]
