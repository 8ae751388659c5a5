"""The training loop: set up groups, model, optimizer and data; step; log; evaluate; checkpoint.

Reads top to bottom: ``pretrain(cfg)`` -> ``_setup`` -> per iteration ``train_step`` (micro-batch
loop with gradient accumulation, one optimizer step) -> log every --log-interval -> eval every
--eval-interval -> save every --save-interval, on SIGTERM (--exit-signal-handler,
--save-on-rendezvous-change) and at the end.
With --skip-train: set up (and --load), evaluate once, return.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megamoe import kernels
from megamoe.data.build import build_train_valid_test_datasets, micro_batches
from megamoe.kernels import guard
from megamoe.model.compile import compile_regions
from megamoe.model.gpt import GPTModel
from megamoe.model.moe.balancing import start_step, update_expert_biases
from megamoe.optim import MixedPrecisionOptimizer
from megamoe.parallel.launch import init_distributed
from megamoe.parallel.layout_rules import elastic_layout_line
from megamoe.parallel.random import model_parallel_seed
from megamoe.parallel.state import ParallelState, device_from_environment, initialize_model_parallel
from megamoe.training import checkpoint as ckpt
from megamoe.training.arguments import ConfigError
from megamoe.training.config import RunConfig
from megamoe.training.exits import Interrupted, RunStopped, StoppedForRendezvous, note_sigint
from megamoe.training.flops import flops_per_token
from megamoe.training.logger import TrainingLogger
from megamoe.training.manual_gc import ManualGC
from megamoe.training.metrics import IntervalMetrics
from megamoe.training.pipeline import PipelineSchedule


class StopCheck:
    """Whether to save and stop after this iteration: SIGTERM or SIGINT (``exit_signal_handler``),
    SIGTERM (``save_on_rendezvous_change``), or ``exit_duration_mins`` passed since ``started``
    (``time.monotonic()`` when the run began, setup included: the budget is the job's).  All are
    agreed over the world with one all-reduce (a signal may reach one rank only, and clocks
    differ), run only when one of them is on.  ``for_rendezvous``: the agreed stop was a SIGTERM
    under ``save_on_rendezvous_change`` (the run then exits for torchrun's next round)."""

    def __init__(self, exit_signal_handler: bool, save_on_rendezvous_change: bool, exit_duration_mins: float | None,
                 device: torch.device, started: float, layout: ParallelState) -> None:
        self.device = device
        self.layout = layout
        self.on_signal = exit_signal_handler or save_on_rendezvous_change
        self.save_on_rendezvous_change = save_on_rendezvous_change
        self.deadline = started + 60.0 * exit_duration_mins if exit_duration_mins else None
        self.exit_duration_mins = exit_duration_mins
        self.received = 0  # the signal's number
        self.for_rendezvous = False
        if self.on_signal:
            signal.signal(signal.SIGTERM, self._handle)
        if exit_signal_handler:
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = max(self.received, signum)
        if signum == signal.SIGINT:
            note_sigint()

    def reason(self) -> str | None:
        """Why to stop now, the same on every rank; None to go on."""
        if not self.on_signal and self.deadline is None:
            return None
        timed_out = self.deadline is not None and time.monotonic() >= self.deadline
        flags = torch.tensor([float(self.received), float(timed_out)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.layout.world_group)
        if flags[0].item():
            received = signal.Signals(int(flags[0].item()))
            self.for_rendezvous = received == signal.SIGTERM and self.save_on_rendezvous_change
            return f"{received.name} received"
        if flags[1].item():
            return f"--exit-duration-in-mins {self.exit_duration_mins} reached"
        return None


def check_finite(result, iteration: int, *, stop: bool, fp16: bool) -> None:
    """Stop the run (``RunStopped``, the same on every rank: the ranks come from the norm's one
    collective) on a NaN/inf loss, or a NaN/inf gradient outside fp16 (where the loss scaler
    skips the step).  ``stop`` False (--no-check-for-nan-in-loss-and-grad): never; the optimizer
    has skipped the step already."""
    if not stop:
        return
    off = "--no-check-for-nan-in-loss-and-grad skips such steps instead"
    if result.nonfinite_loss_ranks:
        raise RunStopped(f"iteration {iteration}: the loss is NaN or inf (on ranks "
                         f"{list(result.nonfinite_loss_ranks)}); stopping ({off})")
    if result.nonfinite_grad_ranks and not fp16:
        raise RunStopped(f"iteration {iteration}: a gradient is NaN or inf (on ranks "
                         f"{list(result.nonfinite_grad_ranks)}; the step was not applied); stopping ({off})")


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0


def prepare_batch(batch: dict, device: torch.device, eod_mask_token: int | None = None) -> dict:
    """The micro-batch on ``device``; with ``eod_mask_token`` (--eod-mask-loss), no loss where the
    input token is that end-of-document id (Megatron's rule)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "sample_ids"}
    if eod_mask_token is not None:
        batch["loss_mask"] = batch["loss_mask"] * (batch["tokens"] != eod_mask_token)
    return batch


def train_step(model, optimizer, batches: list[dict], metrics: IntervalMetrics, device: torch.device,
               eod_mask_token: int | None = None, pipeline: PipelineSchedule | None = None):
    """One optimizer step over this rank's micro-batches of one global batch.

    Each micro-batch loss (LM + auxiliary) is divided by the number of micro-batches, so the
    accumulated gradient is the mean over this rank's share; the optimizer then averages over DP.
    A step that was not skipped then updates the routers' expert biases from the step's loads.
    At PP > 1 ``pipeline`` runs the micro-batches through the stages by its schedule, with the
    same scaling (``megamoe.training.pipeline``).
    """
    model.train()
    optimizer.zero_grad()
    start_step(model)
    step_moe_stats = []
    loss = torch.zeros((), device=device)  # checked for NaN/inf in the optimizer's norm collective
    if pipeline is not None:
        prepared = [prepare_batch(batch, device, eod_mask_token) for batch in batches]
        outputs = pipeline.forward_backward(prepared)
    else:
        outputs = []
        for index, batch in enumerate(batches):
            batch = prepare_batch(batch, device, eod_mask_token)
            # With --overlap-grad-reduce the last micro-batch's backward launches the reduction.
            last = index == len(batches) - 1
            with contextlib.nullcontext() if last else optimizer.no_sync():
                out = model(batch["tokens"], batch["labels"], batch["loss_mask"])
                optimizer.scale_loss(out.loss / len(batches)).backward()
            outputs.append(out)
    for out in outputs:
        # A pipeline stage holds the LM loss (last stage) and its own MoE layers' aux losses.
        for part in (out.lm_loss, out.aux_loss) if pipeline is not None else (out.loss,):
            if part is not None:
                loss += part.detach().float()
        metrics.add_micro_batch(out)
        step_moe_stats.append(out.moe_stats)
    result = optimizer.step(loss=loss)
    if not result.skipped:
        update_expert_biases(model, step_moe_stats)
    return result


def global_sample_ids(step_batches: list[dict], state: ParallelState, device: torch.device) -> list[int]:
    """The dataset indices of one step's global batch, in its order: this rank's micro-batches'
    ``sample_ids`` gathered over the DP group (collective over ``state.dp_group``; the TP ranks
    of a DP rank read the same samples)."""
    mine = torch.cat([batch["sample_ids"] for batch in step_batches]).to(device)
    gathered = [torch.empty_like(mine) for _ in range(state.dp_size)]
    dist.all_gather(gathered, mine, group=state.dp_group)
    return torch.cat(gathered).tolist()


@torch.no_grad()
def evaluate(model, batches_iter, eval_iters: int, device: torch.device, eod_mask_token: int | None = None,
             pipeline: PipelineSchedule | None = None) -> float:
    """Mean LM loss over ``eval_iters`` global batches, averaged over the model's DP group (and at
    PP > 1 sent from the last stage to every stage)."""
    model.eval()
    total = torch.zeros((), device=device)
    count = 0
    for _ in range(eval_iters):
        batches = [prepare_batch(batch, device, eod_mask_token) for batch in next(batches_iter)]
        count += len(batches)
        if pipeline is not None:
            for lm_loss in pipeline.forward_only(batches):
                total += lm_loss
            continue
        for batch in batches:
            total += model(batch["tokens"], batch["labels"], batch["loss_mask"]).lm_loss
    state = model.layout
    dist.all_reduce(total, group=state.dp_group)
    if state.pp_size > 1:
        dist.all_reduce(total, group=state.pp_group)  # only the last stage's is not zero
    model.train()
    return total.item() / (count * state.dp_size)


def _setup(cfg: RunConfig, state: ParallelState, device: torch.device, log: TrainingLogger):
    if kernels.candidate(cfg.execution.fused_kernels, device):
        # Every rank on one verdict: TP or DP ranks on different paths would compute different numbers.
        for line in guard.agree(device):
            log.info(line)
    model_parallel_seed(cfg.train.seed, state, device)
    model = GPTModel(cfg.model, state, cfg.execution, device=device).initialize(cfg.train.seed)
    train_state = TrainState()
    loaded = ckpt.open_checkpoint(cfg.checkpoint.load, cfg.model, state) if cfg.checkpoint.load else None
    if cfg.checkpoint.load and loaded is None:
        log.info(f"no checkpoint found in --load {cfg.checkpoint.load}; starting from scratch")
    # --skip-train evaluates the weights: no optimizer state (nor its LR schedule) is needed.
    load_optim = (loaded is not None and not cfg.checkpoint.finetune and not cfg.checkpoint.no_load_optim
                  and not cfg.train.skip_train)
    schedule = cfg.schedule
    if loaded is not None:
        if load_optim and not loaded.has_optimizer:
            raise ckpt.CheckpointError(
                f"{loaded.directory} holds weights but no optimizer state (e.g. imported from Hugging Face): "
                f"train from it with --finetune, or keep its iteration with --no-load-optim"
            )
        if load_optim:  # as Megatron: the schedule is resumed with the optimizer state
            try:
                schedule, note = cfg.schedule.resumed(loaded.lr_schedule, loaded.directory)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            if note:
                log.info(note)
        loaded.load_model(model)
        if not cfg.checkpoint.finetune:
            train_state = TrainState(loaded.iteration, loaded.consumed_samples)
        log.info(f"loaded checkpoint {loaded.directory} (iteration {loaded.iteration}, saved in layout "
                 f"{loaded.saved_topology.describe()})")
    optimizer = MixedPrecisionOptimizer(model, cfg.optimizer, state)
    if cfg.train.compile:
        compile_regions(model)
        log.info("torch.compile: attention, norms and dense MLPs of every layer")
    if load_optim:
        loaded.load_optimizer(optimizer, model)
    if loaded is not None and not cfg.checkpoint.finetune and not cfg.checkpoint.no_load_rng:
        loaded.restore_rng()
    return model, optimizer, train_state, schedule


def _datasets(cfg: RunConfig):
    gbs = cfg.train.global_batch_size
    evals = cfg.train.train_iters // cfg.train.eval_interval + 1 if cfg.train.eval_interval else 0
    if cfg.train.skip_train:
        evals = 1
    return build_train_valid_test_datasets(
        cfg.data,
        train_samples=cfg.train.train_iters * gbs,
        valid_samples=evals * cfg.train.eval_iters * gbs,
        test_samples=0,
        seq_length=cfg.train.seq_length,
        seed=cfg.train.seed,
    )


def _save(cfg: RunConfig, model, optimizer, schedule, train_state: TrainState, log: TrainingLogger, previous):
    """Save (collective); returns the pending save.  The previous one must have finished first
    (an --async-save still writing is waited for here)."""
    if previous is not None:
        previous.wait()
    where = f"{cfg.checkpoint.save} at iteration {train_state.iteration}"
    pending = ckpt.save_checkpoint(
        cfg.checkpoint.save,
        iteration=train_state.iteration,
        consumed_samples=train_state.consumed_samples,
        model=model,
        optimizer=optimizer,
        model_config=cfg.model,
        layout=model.layout,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        args=cfg.args,
        lr_schedule=schedule.curve(),
        keep_last=cfg.checkpoint.keep_last,
        async_save=cfg.checkpoint.async_save,
        on_published=lambda: log.info(f"background save complete: {where} is the latest checkpoint"),
        save_optimizer=not cfg.checkpoint.no_save_optim,
    )
    log.info(f"saving checkpoint to {where} in the background" if cfg.checkpoint.async_save
             else f"saved checkpoint to {where}")
    return pending


def pretrain(cfg: RunConfig) -> dict:
    """Train as configured; returns the last log record.  Collective: call on every rank."""
    started = time.monotonic()
    device = device_from_environment(cfg.train.device)
    minutes = cfg.train.distributed_timeout_minutes
    init_distributed(device, timeout=timedelta(minutes=minutes) if minutes else None)
    state = initialize_model_parallel(cfg.parallel, cfg.model.experts_by_layer())
    log = TrainingLogger(cfg.logging, rank=state.rank, run_config_dict=cfg.args, train_iters=cfg.train.train_iters)
    elastic_line = elastic_layout_line(cfg.parallel, state)
    if elastic_line is not None:
        log.info(elastic_line)
    try:
        with ckpt.claim_save_dir(cfg.checkpoint.save, state, log) if cfg.checkpoint.save else contextlib.nullcontext():
            return _train(cfg, state, device, log, started)
    finally:
        log.close()


def _train(cfg: RunConfig, state: ParallelState, device: torch.device, log: TrainingLogger, started: float) -> dict:
    for notice in cfg.notices:
        log.info(notice)
    try:  # before the model: a data problem is the user's, and should cost nothing
        train_ds, valid_ds, _ = _datasets(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    evaluate_every = cfg.train.eval_interval
    if evaluate_every and valid_ds is None:
        log.info(f"--split {cfg.data.split}: the validation split is empty; evaluation is skipped "
                 f"(as Megatron does)")
        evaluate_every = 0
    t = cfg.train
    if t.skip_train and valid_ds is None:
        raise ConfigError(f"--skip-train evaluates, and --split {cfg.data.split} leaves no validation documents")
    model, optimizer, train_state, schedule = _setup(cfg, state, device, log)
    if t.skip_train:
        log.info(f"--skip-train: evaluating the model of iteration {train_state.iteration} on {t.eval_iters} "
                 f"global batches of the validation split, then exiting")
        return _run_eval(cfg, model, valid_ds, train_state.iteration, 0, device, log, _pipeline(cfg, model, optimizer,
                                                                                                 device))
    batches = micro_batches(train_ds, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                            dp_rank=state.dp_rank, dp_size=state.dp_size, start_sample=train_state.consumed_samples)
    log.info(
        f"training: {state.describe()}, ZeRO-1 {'on' if cfg.optimizer.use_distributed_optimizer else 'off'}, "
        f"{t.num_microbatches} micro-batches of {t.micro_batch_size} per rank per step, "
        f"params {str(cfg.execution.params_dtype).replace('torch.', '')}, device {device.type}"
    )
    pipeline = _pipeline(cfg, model, optimizer, device)
    stop = StopCheck(t.exit_signal_handler, cfg.checkpoint.save_on_rendezvous_change, t.exit_duration_in_mins, device,
                     started, state)
    metrics = IntervalMetrics(layout=state, device=device, flops_per_token=flops_per_token(cfg.model, t.seq_length),
                              peak_tflops=cfg.logging.peak_tflops)
    record: dict = {}
    sample_ids: list[int] = []  # --log-sample-ids: those of the steps since the last log line
    saved_at = None
    pending = None  # the last save, which may still be writing (--async-save)
    gc_policy = ManualGC(enabled=t.manual_gc, interval=t.manual_gc_interval)
    gc_policy.start()
    try:
        while train_state.iteration < t.train_iters:
            lr = schedule.lr_at(train_state.iteration)
            optimizer.set_lr(lr)
            step_batches = next(batches)
            result = train_step(model, optimizer, step_batches, metrics, device, cfg.eod_mask_token, pipeline)
            if cfg.logging.log_sample_ids:
                sample_ids += global_sample_ids(step_batches, state, device)
            check_finite(result, train_state.iteration + 1, stop=t.check_for_nan_in_loss_and_grad, fp16=t.fp16)
            train_state.iteration += 1
            train_state.consumed_samples += t.global_batch_size
            metrics.add_step(result, tokens=t.global_batch_size * t.seq_length)
            if train_state.iteration % cfg.logging.log_interval == 0 or train_state.iteration == t.train_iters:
                record = metrics.finish_interval(train_state.iteration, train_state.consumed_samples, lr, result)
                if cfg.logging.log_params_norm:
                    record["params_norm"] = optimizer.params_norm()
                if cfg.logging.log_num_zeros_in_grad:
                    record["num_zeros_in_grad"] = optimizer.num_zeros_in_grad()
                if cfg.logging.log_sample_ids:
                    record["sample_ids"], sample_ids = sample_ids, []
                log.log(record)
            gc_policy.after_step(train_state.iteration)
            if evaluate_every and train_state.iteration % evaluate_every == 0:
                with metrics.paused(), gc_policy.around_eval():
                    _run_eval(cfg, model, valid_ds, train_state.iteration,
                              train_state.iteration // t.eval_interval - 1, device, log, pipeline)
            if cfg.checkpoint.save and cfg.checkpoint.save_interval and train_state.iteration % cfg.checkpoint.save_interval == 0:
                with metrics.paused():
                    pending = _save(cfg, model, optimizer, schedule, train_state, log, pending)
                saved_at = train_state.iteration
            reason = stop.reason()
            if reason is None and t.exit_interval and train_state.iteration % t.exit_interval == 0:
                reason = f"--exit-interval {t.exit_interval} reached"
            if reason is not None:
                log.info(f"{reason}: {'saving at' if cfg.checkpoint.save else 'stopping after'} iteration "
                         f"{train_state.iteration} and exiting")
                break
    except Interrupted as err:  # Ctrl-C: say where the run stopped
        err.iteration = train_state.iteration
        raise
    finally:
        gc_policy.stop()
    if cfg.checkpoint.save and saved_at != train_state.iteration:
        pending = _save(cfg, model, optimizer, schedule, train_state, log, pending)
    if pending is not None:
        pending.wait()
        dist.barrier(group=state.world_group)  # every rank returns once the last checkpoint is published
    if stop.for_rendezvous:
        raise StoppedForRendezvous(train_state.iteration)
    return record


def _pipeline(cfg: RunConfig, model, optimizer, device: torch.device) -> PipelineSchedule | None:
    """The rank's pipeline stages and schedule at PP > 1; None at PP 1."""
    if model.layout.pp_size == 1:
        return None
    t = cfg.train
    return PipelineSchedule(model, optimizer, num_microbatches=t.num_microbatches, micro_batch_size=t.micro_batch_size,
                            seq_length=t.seq_length, device=device)


def _run_eval(cfg: RunConfig, model, valid_ds, iteration: int, window: int, device, log: TrainingLogger,
              pipeline: PipelineSchedule | None = None) -> dict:
    """Evaluate the model of ``iteration`` on the ``window``-th run of --eval-iters global batches
    of the validation split (each evaluation of a run reads batches of its own); log and return the
    record."""
    t = cfg.train
    state = model.layout
    start = window * t.eval_iters * t.global_batch_size
    valid_iter = micro_batches(valid_ds, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                               dp_rank=state.dp_rank, dp_size=state.dp_size, start_sample=start)
    loss = evaluate(model, valid_iter, t.eval_iters, device, cfg.eod_mask_token, pipeline)
    record = {"iteration": iteration, "split": "valid", "lm_loss": loss, "ppl": math.exp(min(loss, 30.0))}
    log.log_eval(record)
    return record
