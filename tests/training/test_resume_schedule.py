"""Resuming with another learning-rate schedule (--train-iters, --lr, warmup, decay) is refused
before any step, as Megatron refuses it, unless --use-checkpoint-opt_param-scheduler (keep the
saved curve) or --override-opt_param-scheduler (follow the flags) says which curve to follow."""

import os

import pytest

import pretrain_moe
from megamoe.training.lr_schedule import LRSchedule
from tests.fixtures import TINY_MOE, read_json_log
from tests.harness import run_distributed

LINEAR = TINY_MOE + ["--lr-decay-style", "linear"]  # --lr 1e-2, --lr-warmup-iters 1


def _iters(n: int) -> list[str]:
    return LINEAR + ["--train-iters", str(n)]


def _body(rank, world, tmp):
    from megamoe.training.arguments import ConfigError, parse_config
    from megamoe.training.trainer import pretrain

    os.environ["WORLD_SIZE"] = str(world)
    save = os.path.join(tmp, "ckpt")
    assert pretrain_moe.main(_iters(4) + ["--save", save, "--exit-interval", "2"]) == 0
    never = os.path.join(tmp, "never.jsonl")
    # A converted checkpoint (here to the consolidated form and back) keeps the recorded curve.
    from megamoe.checkpointing.convert.run import convert

    convert(save, os.path.join(tmp, "consolidated"), to="consolidated", progress=None)
    convert(os.path.join(tmp, "consolidated"), os.path.join(tmp, "converted"), progress=None)
    with pytest.raises(ConfigError, match="saved 4 vs now 8"):
        pretrain(parse_config(_iters(8) + ["--load", os.path.join(tmp, "converted"), "--log-json", never]))
    for changed, field in ((_iters(8), r"decay_iters \(--lr-decay-iters/-samples, default --train-iters\): saved 4 vs now 8"),
                           (_iters(4) + ["--lr", "2e-2"], r"lr \(--lr\): saved 0.01 vs now 0.02"),
                           (_iters(4) + ["--lr-warmup-iters", "2"], r"warmup_iters .*: saved 1 vs now 2")):
        with pytest.raises(ConfigError, match=field + ".*give --use-checkpoint-opt_param-scheduler to keep the saved "
                           "schedule, or --override-opt_param-scheduler to follow the flags"):
            pretrain(parse_config(changed + ["--load", save, "--log-json", never]))
        assert not os.path.exists(never) or not open(never).read().strip(), "a training step ran before the refusal"
    for name, extra in (("kept", ["--use-checkpoint-opt_param-scheduler"]), ("override", ["--override-opt_param-scheduler"])):
        assert pretrain_moe.main(_iters(8) + extra + ["--load", save, "--log-json", os.path.join(tmp, f"{name}.jsonl")]) == 0
    # Not resuming the optimizer state (as Megatron) is not resuming the schedule: the flags' curve.
    no_optim = _iters(8) + ["--load", save, "--no-load-optim", "--log-json", os.path.join(tmp, "no_optim.jsonl")]
    assert pretrain_moe.main(no_optim) == 0
    assert pretrain_moe.main(_iters(4) + ["--load", save, "--log-json", os.path.join(tmp, "same.jsonl")]) == 0


def test_another_schedule_is_refused_on_resume_unless_a_flag_says_which_to_follow(tmp_path):
    run_distributed(_body, 1, str(tmp_path), timeout=300)
    saved = LRSchedule(lr=1e-2, decay_style="linear", warmup_iters=1, decay_iters=4)
    flags = LRSchedule(lr=1e-2, decay_style="linear", warmup_iters=1, decay_iters=8)
    for name, curve in (("kept", saved), ("override", flags), ("no_optim", flags), ("same", saved)):
        got = {r["iteration"]: r["lr"] for r in read_json_log(tmp_path / f"{name}.jsonl")}
        assert list(got) == list(range(3, 9 if name != "same" else 5)), name
        assert got == pytest.approx({i: curve.lr_at(i - 1) for i in got}), name


def test_the_two_schedule_flags_exclude_each_other():
    with pytest.raises(ValueError, match="--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are "
                                         "mutually exclusive"):
        LRSchedule(lr=1.0, decay_iters=10, override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=True)
