"""The documented launch scripts: valid shell, and the flags they pass are a valid configuration
for the layouts they advertise (checked with the real parser, without launching anything)."""

import os
import shlex
import subprocess

import pytest
import torch

from megamoe.training.arguments import parse_config
from tests.fixtures import REPO

# What scripts/pretrain_1b_4exp.sh reads from the environment: a developer's own exports of these
# (TRAIN_ITERS=10 for a short quickstart, say) must not change what the tests check.
SCRIPT_SETTINGS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "GPUS_PER_NODE", "MASTER_PORT", "TP", "EP", "MICRO_BATCH",
                   "DATA_PATH", "TOKENIZER_MODEL", "SAVE_DIR", "LOAD_DIR", "TRAIN_ITERS", "MAX_RESTARTS",
                   "WANDB_PROJECT", "EXTRA_ARGS", "MIN_NNODES", "RDZV_ID")

SCRIPTS = ["scripts/quickstart.sh", "scripts/run_tests.sh", "scripts/setup_env.sh",
           "scripts/pretrain_1b_4exp.sh", "scripts/pretrain_slurm.sbatch", ".ci/run"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash(script):
    done = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _launch(tmp_path, **env) -> tuple[list[str], str]:
    """Everything scripts/pretrain_1b_4exp.sh passes to python (torchrun, then pretrain_moe.py's flags),
    and the TORCH_DISABLE_SHARE_RDZV_TCP_STORE it exports, captured by a stand-in python."""
    stub = tmp_path / "python"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-unset}"\n'
                    'for a in "$@"; do printf "%s\\n" "$a"; done\n')
    stub.chmod(0o755)
    inherited = {k: v for k, v in os.environ.items() if k not in SCRIPT_SETTINGS}
    inherited.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    environment = dict(inherited, PYTHON=str(stub), SAVE_DIR=str(tmp_path / "ckpt"), **env)
    out = subprocess.run(["bash", "scripts/pretrain_1b_4exp.sh"], cwd=REPO, env=environment,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return out[1:], out[0]


def _launch_argv(tmp_path, **env):
    return _launch(tmp_path, **env)[0]


def _pretrain_argv(tmp_path, **env):
    """The pretrain_moe.py flags scripts/pretrain_1b_4exp.sh would pass."""
    out = _launch_argv(tmp_path, **env)
    return out[out.index("pretrain_moe.py") + 1:]


def test_1b_4exp_script_restarts_failed_workers_and_saves_in_the_background(tmp_path):
    out = _launch_argv(tmp_path, MAX_RESTARTS="5")
    torchrun, flags = out[:out.index("pretrain_moe.py")], out[out.index("pretrain_moe.py") + 1:]
    assert torchrun[:2] == ["-m", "torch.distributed.run"]
    assert torchrun[torchrun.index("--max-restarts") + 1] == "5"
    cfg = parse_config(flags + ["--device", "cpu"], world_size=8)
    assert cfg.checkpoint.async_save and cfg.checkpoint.load == cfg.checkpoint.save


@pytest.mark.parametrize("env,world", [({}, 8), ({"TP": "2", "EP": "2"}, 16), ({"EP": "4", "NNODES": "2"}, 16)])
def test_1b_4exp_script_passes_a_valid_configuration(tmp_path, env, world):
    argv = _pretrain_argv(tmp_path, **env) + ["--device", "cpu"]
    cfg = parse_config(argv, world_size=world)
    assert cfg.model.num_layers == 24 and cfg.model.hidden_size == 2048 and cfg.model.num_experts == (4,)
    assert cfg.train.global_batch_size == 256 and cfg.optimizer.use_distributed_optimizer
    assert cfg.execution.params_dtype == torch.bfloat16
    assert cfg.train.exit_signal_handler and cfg.train.compile and cfg.optimizer.overlap_grad_reduce, shlex.join(argv)


def test_1b_4exp_script_elastic_mode_rendezvous_on_the_served_store_and_fits_the_smaller_world(tmp_path):
    out, share_off = _launch(tmp_path, MIN_NNODES="1", NNODES="2", MASTER_ADDR="10.0.0.1", RDZV_ID="job7")
    assert share_off == "1"  # what --elastic needs (a node that joins hangs torch's shared agent store)
    torchrun, flags = out[:out.index("pretrain_moe.py")], out[out.index("pretrain_moe.py") + 1:]
    launch = shlex.join(torchrun)
    assert ("--nnodes 1:2 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29500 --rdzv-conf is_host=false "
            "--rdzv-id job7") in launch and "--node-rank" not in launch, launch
    for world in (8, 16):  # one node or both; EP 4 fits both
        cfg = parse_config(flags + ["--device", "cpu"], world_size=world)
        assert cfg.parallel.elastic and cfg.checkpoint.save_on_rendezvous_change and cfg.train.global_batch_size == 256
    static, share_off = _launch(tmp_path)
    assert "--elastic" not in static and "--node-rank" in static and share_off == "unset"
