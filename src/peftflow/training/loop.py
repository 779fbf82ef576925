"""The training loop: seeded AdamW, warmup + decay, clipping, accumulation, per-epoch validation.

One loop for every task and method: the task supplies an
:class:`~peftflow.training.objective.Objective` (its loss and its validation), the
method registry supplies the method's hooks (AdaLoRA's rank budget, extra loss).
Resumable checkpoints (:mod:`.checkpoint`) continue a killed run exactly; the
:mod:`.finite_guard` stops at the first non-finite step.

Under a multi-process launch (``train.devices`` > 1, see
:mod:`peftflow.pipeline.launch`) the same loop trains data-parallel: every process
runs its share of each step through DDP, whose bucketed all-reduce overlaps the last
backward of the step, and rank 0 alone validates (see :mod:`.replicas`). In one process
nothing of that runs.

Depends on: config, models.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from peftflow.config import ExperimentConfig, TrainConfig
from peftflow.errors import TrainingError
from peftflow.models.backbone import trained_state
from peftflow.models.dropout import use_uniform_mask_dropout
from peftflow.models.methods.registry import METHODS
from peftflow.training.batching import batch_order, optimizer_steps
from peftflow.training.checkpoint import Checkpoints, Progress, rng_state
from peftflow.training.finite_guard import FINITE_SYNC_STEPS, FiniteGuard, NonFiniteError
from peftflow.training.memory import peak_memory_mb, reset_peak_memory
from peftflow.training.objective import Objective
from peftflow.training.precision import (
    compiled_for_training,
    pick_device,
    store_frozen_weights_for_autocast,
    warn_if_emulated,
)
from peftflow.training.replicas import Replicas, data_parallel, resume_replicas

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainOutcome:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    train_seconds: float = 0.0
    examples_per_second: float = 0.0
    tokens_per_second: float = 0.0
    peak_memory_mb: float = 0.0
    device: str = "cpu"
    processes: int = 1  # data-parallel replicas that trained together
    backend: str = ""  # their collective backend (gloo, nccl) when more than one
    weights_digest: str = ""  # sha256 of the trainable weights all replicas agreed on (N > 1)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW; no weight decay on biases and norms (1-D tensors).

    The fused kernel on CUDA and on the CPU: on this project's 2-core CPU a step over
    MiniLM's 22.7M parameters took 10.1 ms fused against 39.5 ms for the default foreach
    (docs/performance.md), the same update to rounding (2e-7 apart after 20 steps).
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise TrainingError("the method left no trainable parameters; check method settings")
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type in ("cuda", "cpu"))


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )


def train_model(
    model: nn.Module,
    objective: Objective,
    cfg: ExperimentConfig,
    on_epoch: EpochCallback | None,
    checkpoints: Checkpoints | None = None,
) -> TrainOutcome:
    """Train for ``cfg.train.epochs``; keep the weights of the best validation epoch.

    With ``checkpoints`` (and ``train.checkpoint_every_steps`` > 0) the loop resumes
    from the latest checkpoint of the run key, if any, and writes one every
    ``train.checkpoint_every_steps`` optimizer steps and at each epoch end (see
    :mod:`peftflow.training.checkpoint`). In a multi-process launch every process calls this
    with the same arguments; rank 0 validates and calls ``on_epoch``, the others
    receive its metrics; rank 0 writes the checkpoints (with every rank's RNG
    states) and every rank resumes from the folder rank 0 chose.
    """
    tc = cfg.train
    if not objective.lengths:
        raise TrainingError("the train split is empty; check data.split fractions and the data")
    set_seed(cfg.training_seed)
    device, replicas = _place(model, tc)
    warn_if_emulated(device, tc.precision)
    store_frozen_weights_for_autocast(model, device, tc.precision)
    use_uniform_mask_dropout(model)  # on the CPU, the same masks' law, cheaper draws
    reset_peak_memory(device)
    if not tc.checkpoint_every_steps:
        checkpoints = None
    optimizer, scheduler = _optimizer_and_schedule(model, objective, cfg, device)
    # DDP's constructor also starts every replica from rank 0's weights.
    forward = compiled_for_training(replicas.prepare(model) if replicas else model, tc.compile)
    progress, checkpointing = _resume(
        checkpoints, replicas, model, optimizer, scheduler, _layout(objective, tc)
    )
    started = time.perf_counter()
    save = None
    if checkpointing:
        state = (model, optimizer, scheduler, progress)
        save = partial(_save_checkpoint, checkpoints, replicas, state, started)
    try:
        while progress.epoch <= tc.epochs:
            loss = _run_epoch(
                model, objective, cfg, optimizer, scheduler, replicas, progress, save, forward
            )
            _end_epoch(model, objective, tc, replicas, progress, on_epoch, loss)
            if save:
                save()
    except NonFiniteError:
        if checkpoints:  # the same run key would replay the same steps into the same fault
            checkpoints.discard()
        raise
    outcome = TrainOutcome(device=str(device))
    outcome.train_seconds = progress.seconds + time.perf_counter() - started
    return _finish(model, objective, tc, progress, replicas, outcome)


def _save_checkpoint(checkpoints, replicas, state, started: float) -> None:
    """Checkpoint the state after the latest optimizer step (rank 0, or the one process,
    writes; gathering every rank's RNG states is a collective, so every rank calls this)."""
    model, optimizer, scheduler, progress = state
    seconds = progress.seconds + time.perf_counter() - started
    rngs = replicas.all_gather(rng_state()) if replicas else None
    if checkpoints:
        checkpoints.save(model, optimizer, scheduler, progress, seconds, rngs)


def _layout(objective: Objective, tc: TrainConfig) -> dict[str, int]:
    """What a checkpoint's position means: training examples and optimizer steps per epoch."""
    steps_per_epoch = math.ceil(len(objective.lengths) / (tc.batch_size * tc.grad_accum_steps))
    return {"train_examples": len(objective.lengths), "steps_per_epoch": steps_per_epoch}


def _resume(
    checkpoints, replicas, model, optimizer, scheduler, layout: dict[str, int]
) -> tuple[Progress, bool]:
    """The progress of the latest checkpoint, loaded into model/optimizer (else a fresh
    start), and whether this run writes checkpoints (rank 0 decides for every replica)."""
    if replicas:
        progress, checkpointing = resume_replicas(
            replicas, checkpoints, model, optimizer, scheduler
        )
    else:
        progress = checkpoints.restore(model, optimizer, scheduler) if checkpoints else None
        checkpointing = checkpoints is not None
    if progress is None:
        return Progress(layout=layout), checkpointing
    if progress.layout != layout:  # the run key pins data and config: the code changed
        folder = checkpoints.folder if checkpoints else "outputs/checkpoints/<run key>"
        raise TrainingError(
            f"checkpoint in {folder} was written for {progress.layout}, but this run has "
            f"{layout}; delete {folder} to train this run key from the start"
        )
    return progress, checkpointing


def _optimizer_and_schedule(model: nn.Module, objective: Objective, cfg, device):
    """AdamW and its warmup/decay schedule over every optimizer step of the run."""
    tc = cfg.train
    steps_per_epoch = _layout(objective, tc)["steps_per_epoch"]
    optimizer = make_optimizer(model, tc, device)
    scheduler = make_scheduler(optimizer, tc, steps_per_epoch * tc.epochs)
    method = METHODS[cfg.method.name]
    if method.prepare_training is not None:  # e.g. AdaLoRA's rank-budget schedule
        method.prepare_training(model, cfg.method, steps_per_epoch * tc.epochs)
    return optimizer, scheduler


def _end_epoch(model, objective, tc: TrainConfig, replicas, progress: Progress, on_epoch, loss):
    """Validate, record the epoch (and the best epoch's weights), move on to the next epoch."""
    epoch = progress.epoch
    metrics = {"epoch": float(epoch), "train_loss": loss}
    metrics.update(_validate(model, objective, replicas))
    progress.history.append(metrics)
    if on_epoch and (replicas is None or replicas.is_main):
        on_epoch(epoch, metrics)
    if objective.improves(metrics[objective.best_metric], progress.best):
        progress.best, progress.best_epoch = metrics[objective.best_metric], epoch
        progress.best_state = trained_state(model) if tc.restore_best_epoch else None
    progress.next_epoch()


def _finish(model, objective, tc: TrainConfig, progress: Progress, replicas, outcome):
    """Restore the best epoch's weights; fill in the outcome's history, speed and memory."""
    outcome.history, outcome.best_epoch = progress.history, progress.best_epoch
    if replicas:
        outcome.processes, outcome.backend = replicas.size, replicas.backend
        outcome.weights_digest = replicas.require_in_sync(model)
    if progress.best_state is not None and outcome.best_epoch != tc.epochs:
        model.load_state_dict(progress.best_state, strict=False)
    seconds = max(outcome.train_seconds, 1e-9)
    outcome.examples_per_second = len(objective.lengths) * tc.epochs / seconds
    outcome.tokens_per_second = sum(objective.lengths) * tc.epochs / seconds
    outcome.peak_memory_mb = peak_memory_mb(next(model.parameters()).device)
    return outcome


def _place(model: nn.Module, tc: TrainConfig) -> tuple[torch.device, Replicas | None]:
    """Move the model to its device; in a multi-process launch, also sync the replicas."""
    replicas = data_parallel(tc.device)
    device = replicas.device if replicas else pick_device(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    model.to(device)
    return device, replicas


def _validate(model: nn.Module, objective: Objective, replicas: Replicas | None) -> dict:
    """The epoch's validation metrics: computed by rank 0, the same on every replica."""
    if replicas is None:
        return objective.validate(model)
    return replicas.broadcast(objective.validate(model) if replicas.is_main else None)


def _run_epoch(
    model,
    objective: Objective,
    cfg,
    optimizer,
    scheduler,
    replicas,
    progress: Progress,
    save: Callable[[], None] | None,
    forward: nn.Module,
) -> float:
    """The rest of epoch ``progress.epoch`` (all of it unless resumed mid-epoch); its mean loss.

    ``forward``: what the training forward passes run through (``model``, or ``model``
    compiled: see :func:`compiled_for_training`).

    Raises :class:`NonFiniteError` at the first step whose loss or gradient norm is not
    finite, before the optimizer applies it. ``save`` writes a checkpoint every
    ``train.checkpoint_every_steps`` steps (the epoch's last step is left to the
    epoch-end checkpoint, after validation). With ``replicas`` each process runs its
    shard of every step and the step's gradients and loss are summed over the
    processes before the optimizer step.
    """
    tc, epoch = cfg.train, progress.epoch
    model.train()
    # Length grouping saves compute only when a batch is padded to its own longest;
    # under a fixed width, or no padding, it would only make batches less random.
    grouped = tc.group_by_length and cfg.model.padding == "longest"
    batches = batch_order(objective.lengths, tc.batch_size, cfg.training_seed, epoch, grouped)
    steps = optimizer_steps(batches, tc.grad_accum_steps, unpadded=cfg.model.padding == "none")
    trainable = [p for p in model.parameters() if p.requires_grad]
    hook = METHODS[cfg.method.name].after_optimizer_step  # e.g. AdaLoRA's rank re-allocation
    after_step = partial(hook, model) if hook else None
    guard = FiniteGuard(optimizer, epoch, len(steps), deferred=after_step is None)
    desc, quiet = f"epoch {epoch}/{tc.epochs}", not tc.progress
    bar = tqdm(total=len(steps), initial=progress.step, desc=desc, disable=quiet, leave=False)
    for step in range(progress.step + 1, len(steps) + 1):  # a resumed epoch skips done steps
        loss = _train_step(model, forward, objective, cfg, steps[step - 1], trainable, replicas)
        check = partial(guard.check, loss, step)  # before optimizer.step(): see FiniteGuard
        _optimizer_step(trainable, optimizer, scheduler, tc.max_grad_norm, after_step, check)
        progress.losses.append(loss)
        progress.step = step
        bar.update()
        if step % FINITE_SYNC_STEPS == 0:
            guard.sync()
            bar.set_postfix(loss=f"{torch.stack(progress.losses[-20:]).mean().item():.4f}")
        if save and step % tc.checkpoint_every_steps == 0 and step < len(steps):
            guard.sync()  # never checkpoint a state past a non-finite step
            save()
    bar.close()
    guard.sync()
    return torch.stack(progress.losses).mean().item()


def _train_step(model, forward, objective, cfg, micro_batches, trainable, replicas) -> torch.Tensor:
    """Gradients of one optimizer step (summed over replicas); the step's loss, a [] tensor."""
    device = trainable[0].device
    loss = _accumulate_gradients(forward, objective, micro_batches, device, replicas)
    if replicas:
        loss = replicas.sum(loss)
    method = METHODS[cfg.method.name]
    if method.extra_loss:  # a function of the weights only: once per optimizer step
        method.extra_loss(model).backward()
    return loss


def _accumulate_gradients(
    model: nn.Module,
    objective: Objective,
    micro_batches: list[list[int]],
    device: torch.device,
    replicas: Replicas | None = None,
) -> torch.Tensor:
    """Forward + backward every micro-batch of one optimizer step; returns the step's mean loss.

    Each micro-batch adds its summed loss divided by the step's loss units (examples
    or target tokens), so the accumulated gradient is the mean over the whole step
    whatever the micro-batch sizes (one example each under padding "none", a short
    last batch). With ``replicas``, ``model`` is the DDP wrapper and this process runs
    only its share of the step (:func:`_replica_share`), still divided by the units of
    the whole step, so the sum over the processes is that mean; DDP averages over the
    processes, hence the factor ``replicas.size``. The loss returned is this process's
    part of the step's loss.
    """
    units = max(sum(objective.loss_units(idx) for idx in micro_batches), 1)
    if replicas is None:
        share, scale, sync_at = [(idx, 1.0) for idx in micro_batches], 1.0, None
    else:
        share, scale = _replica_share(micro_batches, replicas), float(replicas.size)
        sync_at = len(share) - 1  # gradients all-reduced during the last backward only
    step_loss = torch.zeros((), device=device)
    for i, (idx, weight) in enumerate(share):
        no_sync = sync_at is not None and i != sync_at
        with model.no_sync() if no_sync else contextlib.nullcontext():
            loss = objective.summed_loss(model, idx, device) * (weight / units)
            (loss * scale).backward()
        step_loss += loss.detach()
    return step_loss


def _replica_share(micro_batches: list[list[int]], replicas: Replicas) -> list[tuple[list, float]]:
    """This process's (examples, weight) per forward of a step: as many on every process.

    DDP pairs each process's synchronising backward with the others', so every process
    runs the same number of forwards; a process left without examples runs one
    weighted 0 (it adds nothing). accelerate's ``even_batches`` and DDP's ``Join`` work
    per dataloader batch, not per micro-batch of a step, so they cannot do this here.
    Micro-batches of one example (padding "none") are dealt out whole; larger ones are
    split (:meth:`Replicas.shard`).
    """
    if all(len(idx) == 1 for idx in micro_batches):
        mine = micro_batches[replicas.rank :: replicas.size]
        rounds = -(-len(micro_batches) // replicas.size)  # ceil
    else:
        mine = [replicas.shard(idx) for idx in micro_batches]
        rounds = len(micro_batches)
    share = [(idx, 1.0) for idx in mine if idx]
    return share + [(micro_batches[0][:1], 0.0)] * (rounds - len(share))


def _optimizer_step(
    trainable,
    optimizer,
    scheduler,
    max_grad_norm,
    after_step: Callable[[int], None] | None,
    check: Callable[[torch.Tensor], None] | None = None,
) -> None:
    """Clip, check, step, then let the method act on the fresh weights and the still-present grads.

    ``check`` gets the total gradient norm (a [] tensor, before clipping) ahead of
    ``optimizer.step()``: it raises, or flags the step for the optimizer to skip.
    """
    if max_grad_norm:
        norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    elif check is not None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
    if check is not None:
        check(norm)
    optimizer.step()
    scheduler.step()
    if after_step is not None:
        after_step(scheduler.last_epoch)  # optimizer steps taken so far, 1-based
    optimizer.zero_grad(set_to_none=True)
