"""The training loop: seeded AdamW, warmup + decay, clipping, accumulation, per-epoch eval.

Texts are tokenised once up front (no padding); training batches are padded as
``model.padding`` says (see ``train_padding``), evaluation batches always to their
own longest (see ``predict_logits``).

Under a multi-process launch (``accelerate launch -m peftflow.distributed``) the
same loop trains data-parallel: every process shards each micro-batch, gradients
are summed over the processes before each optimizer step, and rank 0 alone
validates (see :mod:`peftflow.distributed`). In one process nothing of that runs.
"""

from __future__ import annotations

import contextlib
import math
import random
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from peftflow.checkpoint import Checkpoints, Progress, rng_state
from peftflow.config import ExperimentConfig, TrainConfig
from peftflow.distributed import Replicas, data_parallel, resume_replicas
from peftflow.errors import TrainingError
from peftflow.methods import METHODS
from peftflow.metrics import classification_metrics
from peftflow.modeling import trained_state

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class EncodedSplit:
    """Token ids per example (unpadded, truncated) and integer labels."""

    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


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
    weights_digest: str = ""  # sha256 of the trainable weights all replicas agreed on (N > 1)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainingError(
            "train.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'"
        )
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def encode(tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int) -> EncodedSplit:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return EncodedSplit([list(ids) for ids in encoded["input_ids"]], list(labels))


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str, pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the batch's longest (or ``pad_to``): input_ids, attention_mask [B, T]."""
    width = pad_to or max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        input_ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return input_ids, mask


@dataclass(frozen=True)
class Padding:
    """How token-id lists become a batch: pad id, side, and width (None: the batch's longest)."""

    pad_id: int
    side: str
    width: int | None = None

    def collate(
        self, data: EncodedSplit, idx: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask [B, T] and labels [B] of the examples ``idx``."""
        ids, mask = pad_batch([data.input_ids[i] for i in idx], self.pad_id, self.side, self.width)
        return ids, mask, torch.tensor([data.labels[i] for i in idx], dtype=torch.long)


def train_padding(cfg: ExperimentConfig, train: EncodedSplit, pad_id: int) -> Padding:
    """The padding of training batches for ``model.padding``.

    longest: each batch to its own longest; max_length: every batch to
    model.max_length; train_longest: every batch to the longest training example
    (after truncation); none: nothing to pad, as every micro-batch holds one
    example (see ``optimizer_steps``).
    """
    width = None
    if cfg.model.padding == "max_length":
        width = cfg.model.max_length
    elif cfg.model.padding == "train_longest":
        width = max(len(ids) for ids in train.input_ids)
    return Padding(pad_id, cfg.model.padding_side, width)


def optimizer_steps(
    batches: list[list[int]], grad_accum_steps: int, unpadded: bool
) -> list[list[list[int]]]:
    """Group batches into optimizer steps, each a list of micro-batches of example indices.

    A step covers ``grad_accum_steps`` batches. ``unpadded`` (model.padding "none")
    runs each example of those batches alone, so a step still sees
    batch_size * grad_accum_steps examples: the effective batch is unchanged.
    """
    steps = [batches[i : i + grad_accum_steps] for i in range(0, len(batches), grad_accum_steps)]
    if unpadded:
        return [[[i] for batch in step for i in batch] for step in steps]
    return steps


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW; no weight decay on biases and norms (1-D tensors)."""
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
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )


def batch_order(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """Shuffled batches of example indices, reproducible per (seed, epoch).

    With ``group_by_length``, each "megabatch" of 50 batches is sorted by length
    before being cut, so a batch holds similar lengths and little padding; the
    batches are then shuffled so lengths still vary from step to step.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    if group_by_length:
        mega = batch_size * 50
        order = [
            i
            for start in range(0, len(order), mega)
            for i in sorted(order[start : start + mega], key=lambda j: -lengths[j])
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def autocasts(device: torch.device, precision: str = "auto") -> bool:
    """Whether bf16 autocast is on: when asked for, or on "auto" with a bf16-capable GPU."""
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast when ``autocasts``; else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocasts(device, precision))


def frozen_matmul_weights(model: nn.Module) -> list[nn.Parameter]:
    """Frozen float32 Linear/Conv1D weights [out, in], except those tied to an embedding."""
    from transformers.pytorch_utils import Conv1D

    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # DoRA also reads its base weight outside the matmul (the column norm), in float32.
    dora = {
        id(m.base_layer.weight)
        for m in model.modules()
        if hasattr(m, "base_layer") and any(getattr(m, "use_dora", {}).values())
    }
    weights = {
        id(m.weight): m.weight
        for m in model.modules()
        if isinstance(m, nn.Linear | Conv1D)
        and not m.weight.requires_grad
        and m.weight.dtype == torch.float32
        and id(m.weight) not in tied | dora
    }
    return list(weights.values())


def store_frozen_weights_for_autocast(model: nn.Module, device: torch.device, precision: str):
    """Under bf16 autocast, keep frozen matmul weights in bf16 once (same math, less work).

    Autocast casts a float32 matmul weight to bf16 on every forward (its cast cache
    keeps only weights that require grad); a frozen weight casts to the same bf16
    values every time, so storing it once computes exactly the same, saves the cast
    (about 6% of a SmolLM2 LoRA step on CPU) and half of that weight's memory.
    Embedding-tied weights (LM heads) stay: embeddings are not autocast.
    """
    if not autocasts(device, precision):
        return
    for weight in frozen_matmul_weights(model):
        weight.data = weight.data.to(torch.bfloat16)


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    data: EncodedSplit,
    batch_size: int,
    pad_id: int,
    side: str,
    precision: str = "auto",
) -> torch.Tensor:
    """Logits [N, C] in input order; batches are length-sorted to minimise padding.

    Every ``model.padding`` strategy is evaluated with batches padded to their own
    longest: pads are masked, decoders count positions over real tokens
    (``mask_positions``) and encoders pad on the right (left is refused), so a
    text's logits do not depend on the padding around it and a wider pad would
    only cost compute. tests/test_knobs.py checks this invariance.
    """
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    chunks = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad_batch([data.input_ids[i] for i in idx], pad_id, side)
        with autocast(device, precision):
            chunks.append(model(ids.to(device), mask.to(device)).float().cpu())
    logits = torch.cat(chunks) if chunks else torch.empty(0)
    restored = torch.empty_like(logits)
    restored[torch.tensor(order, dtype=torch.long)] = logits
    return restored


def evaluate_split(
    model: nn.Module, data: EncodedSplit, cfg: ExperimentConfig, pad_id: int, prefix: str
) -> tuple[dict[str, float], list[int]]:
    logits = predict_logits(
        model, data, cfg.train.eval_batch_size, pad_id, cfg.model.padding_side, cfg.train.precision
    )
    predictions = logits.argmax(dim=-1).tolist()
    positive = cfg.data.labels.index(cfg.data.positive_label)
    return classification_metrics(data.labels, predictions, positive, prefix=prefix), predictions


_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Start counting this run's peak: CUDA's allocator peak, or the RSS high-water mark.

    A flow process runs many stages (and a study many variants): the process's
    lifetime peak would charge a run for what ran before it. Linux resets VmHWM
    when "5" is written to /proc/self/clear_refs; elsewhere the lifetime peak stays.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Not Linux, or not allowed: peak_memory_mb then reads the lifetime peak.
    with contextlib.suppress(OSError):
        _PROC_CLEAR_REFS.write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on GPU; on CPU the RSS high-water mark since reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = _PROC_STATUS.read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024  # "VmHWM:  123 kB"
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass(frozen=True)
class Objective:
    """What the loop minimises and how it scores an epoch, for one task.

    ``loss_units(idx)`` is what a step's loss is averaged over (examples for
    classification, target tokens for generation); it is known before any forward
    pass, so micro-batches of any size can be weighted exactly.
    ``summed_loss(model, idx, device)`` is a micro-batch's loss summed over those
    units. ``validate(model)`` returns the epoch's validation metrics, among them
    ``best_metric``.
    """

    lengths: list[int]  # tokens per training example (batch grouping, throughput)
    loss_units: Callable[[Sequence[int]], int]
    summed_loss: Callable[[nn.Module, Sequence[int], torch.device], torch.Tensor]
    validate: Callable[[nn.Module], dict[str, float]]
    best_metric: str
    higher_is_better: bool = True

    def improves(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best


def classification_objective(
    train: EncodedSplit, val: EncodedSplit, cfg: ExperimentConfig, pad_id: int
) -> Objective:
    """Cross-entropy of the labels, averaged over examples; the best epoch has the top val F1."""
    padding = train_padding(cfg, train, pad_id)
    precision = cfg.train.precision

    def summed_loss(model: nn.Module, idx: Sequence[int], device: torch.device) -> torch.Tensor:
        ids, mask, labels = padding.collate(train, idx)
        with autocast(device, precision):
            logits = model(ids.to(device), mask.to(device))  # [B, C]
        return nn.functional.cross_entropy(logits.float(), labels.to(device), reduction="sum")

    def validate(model: nn.Module) -> dict[str, float]:
        return evaluate_split(model, val, cfg, pad_id, prefix="val_")[0]

    return Objective(
        lengths=[len(ids) for ids in train.input_ids],
        loss_units=len,
        summed_loss=summed_loss,
        validate=validate,
        best_metric="val_f1",
    )


def train_classifier(
    model: nn.Module,
    train: EncodedSplit,
    val: EncodedSplit,
    cfg: ExperimentConfig,
    pad_id: int,
    on_epoch: EpochCallback | None = None,
    checkpoints: Checkpoints | None = None,
) -> TrainOutcome:
    """Train for ``cfg.train.epochs``, evaluating on ``val`` after every epoch."""
    objective = classification_objective(train, val, cfg, pad_id)
    return train_model(model, objective, cfg, on_epoch, checkpoints)


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
    :mod:`peftflow.checkpoint`). In a multi-process launch every process calls this
    with the same arguments; rank 0 validates and calls ``on_epoch``, the others
    receive its metrics; rank 0 writes the checkpoints (with every rank's RNG
    states) and every rank resumes from the folder rank 0 chose.
    """
    tc = cfg.train
    if not objective.lengths:
        raise TrainingError("the train split is empty; check data.split fractions and the data")
    set_seed(cfg.seed)
    device, replicas = _place(model, tc)
    store_frozen_weights_for_autocast(model, device, tc.precision)
    reset_peak_memory(device)
    if not tc.checkpoint_every_steps:
        checkpoints = None
    optimizer, scheduler = _optimizer_and_schedule(model, objective, cfg, device)
    forward = compiled_for_training(model, tc.compile)
    progress, checkpointing = _resume(
        checkpoints, replicas, model, optimizer, scheduler, _layout(objective, tc)
    )
    outcome = TrainOutcome(device=str(device), processes=replicas.size if replicas else 1)
    started = time.perf_counter()

    def save_checkpoint() -> None:  # the state after the latest optimizer step
        seconds = progress.seconds + time.perf_counter() - started
        rngs = replicas.all_gather(rng_state()) if replicas else None  # a collective: every rank
        if checkpoints:  # rank 0 (or the one process) writes
            checkpoints.save(model, optimizer, scheduler, progress, seconds, rngs)

    save = save_checkpoint if checkpointing else None
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
    outcome.train_seconds = progress.seconds + time.perf_counter() - started
    return _finish(model, objective, tc, progress, replicas, outcome)


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
    if replicas:
        replicas.broadcast_trainable(model)
    return device, replicas


def _validate(model: nn.Module, objective: Objective, replicas: Replicas | None) -> dict:
    """The epoch's validation metrics: computed by rank 0, the same on every replica."""
    if replicas is None:
        return objective.validate(model)
    return replicas.broadcast(objective.validate(model) if replicas.is_main else None)


def compiled_for_training(model: nn.Module, compile_model: bool) -> nn.Module:
    """What training forward passes run through: ``model``, or ``torch.compile`` of it.

    Only the training forward uses the compiled wrapper; the optimizer, validation,
    checkpoints and saving keep ``model`` (the wrapper shares its parameters, so state
    dict keys never gain ``_orig_mod.``). ``dynamic=True`` because batches padded to
    their own longest change width from step to step: one graph with a symbolic
    length instead of a recompile per width.
    """
    if not compile_model:
        return model
    return torch.compile(model, dynamic=True)


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
    batches = batch_order(objective.lengths, tc.batch_size, cfg.seed, epoch, grouped)
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
        loss = replicas.all_reduce_gradients(trainable, loss)
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
    last batch). With ``replicas`` this process runs only its shard of each
    micro-batch, still divided by the units of the whole step, so the sum over the
    processes is that mean (and the loss returned is this process's part of it).
    """
    units = sum(objective.loss_units(idx) for idx in micro_batches)
    if replicas:
        micro_batches = [shard for shard in map(replicas.shard, micro_batches) if shard]
    step_loss = torch.zeros((), device=device)
    for idx in micro_batches:
        loss = objective.summed_loss(model, idx, device) / max(units, 1)
        loss.backward()
        step_loss += loss.detach()
    return step_loss


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


# Steps between host reads of the deferred finiteness flag on a GPU (see FiniteGuard).
FINITE_SYNC_STEPS = 20


class NonFiniteError(TrainingError):
    """A step's loss or gradient norm was NaN or infinite; the optimizer did not apply it."""


class FiniteGuard:
    """Stops an epoch at the first optimizer step whose loss or gradient norm is not finite.

    On a CPU every step is checked on the host before ``optimizer.step()`` (a
    ``.item()`` there costs nothing). On a GPU a host read each step would stall the
    kernel queue, so with fused AdamW (``make_optimizer`` on CUDA) the check stays on
    the device: a sticky flag [] is handed to the optimizer as ``found_inf`` (the AMP
    grad-scaler mechanism), so fused AdamW skips the bad step and every later one
    (weights, moments and step counts untouched), and the host reads the flags every
    FINITE_SYNC_STEPS steps, before each checkpoint and at the epoch end, then raises
    naming the first bad step. Methods with an after-step hook (AdaLoRA edits weights
    from the gradients) are checked on the host every step.
    """

    def __init__(self, optimizer, epoch: int, n_steps: int, deferred: bool = True):
        self.optimizer, self.epoch, self.n_steps = optimizer, epoch, n_steps
        self.deferred = deferred and bool(optimizer.defaults.get("fused"))
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, [2] finite flags) unread
        self.bad: torch.Tensor | None = None  # [] on the device: any bad step so far

    def check(self, loss: torch.Tensor, step: int, norm: torch.Tensor) -> None:
        finite = torch.stack([torch.isfinite(loss), torch.isfinite(norm)])  # [2] bool
        if not self.deferred:
            self._raise_unless_finite(step, finite)
            return
        self.pending.append((step, finite))
        step_bad = (~finite.all()).float()
        self.bad = step_bad if self.bad is None else torch.maximum(self.bad, step_bad)
        self.optimizer.found_inf = self.bad

    def sync(self) -> None:
        """Read the deferred flags (one host sync); raise at the first non-finite step."""
        pending, self.pending = self.pending, []
        if pending:
            flags = torch.stack([finite for _, finite in pending]).cpu()  # [S, 2]
            for (step, _), finite in zip(pending, flags, strict=True):
                self._raise_unless_finite(step, finite)

    def _raise_unless_finite(self, step: int, finite: torch.Tensor) -> None:
        loss_ok, norm_ok = (bool(flag) for flag in finite)
        if loss_ok and norm_ok:
            return
        what = "loss" if not loss_ok else "gradient norm"
        raise NonFiniteError(
            f"non-finite {what} in epoch {self.epoch} at optimizer step {step} of "
            f"{self.n_steps}; training stopped before the optimizer applied it. Lower "
            "train.lr, set train.max_grad_norm (e.g. 1.0), or train in float32 "
            "(model.dtype: float32, train.precision: fp32)"
        )
