"""One fine-tuning run, written once for every task: build, train, score, save, verify, log.

The task (:class:`~peftflow.task.base.TaskKind`) supplies its model, its encoded data
and objective, its scoring and its reload check; everything else (parameter counts,
the memory prediction, epoch curves, history, the saved folder) is the same for all.

Depends on: config, data, models, training, tracking.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from peftflow.config import ExperimentConfig
from peftflow.data.split import sample_train
from peftflow.models.assets import ResolvedModel
from peftflow.models.backbone import count_parameters
from peftflow.models.saved import LoadedModel, base_reference, build_model, load_model, save_model
from peftflow.task.base import TaskKind
from peftflow.tracking.runs import RunTracker
from peftflow.training.allocator import loaded_allocator
from peftflow.training.checkpoint import Checkpoints
from peftflow.training.estimate import (
    estimate_device,
    estimate_for_model,
    precision_mode,
    runtime_baseline_bytes,
)
from peftflow.training.loop import TrainOutcome, train_model
from peftflow.training.precision import pick_device

# Saved models must reload to the same logits within this (float noise only).
RELOAD_ATOL = 1e-4


@dataclass(frozen=True)
class TrainedModel:
    """What a training run leaves behind: its final metrics, its folder, its epoch history."""

    metrics: dict[str, float]
    model_dir: str
    history: list[dict[str, float]] = field(default_factory=list)


def train_and_evaluate(
    task: TaskKind,
    cfg: ExperimentConfig,
    splits: dict[str, pd.DataFrame],
    tracker: RunTracker,
    out_dir: Path,
    checkpoints: Checkpoints | None = None,
    baseline: Any | None = None,
) -> TrainedModel:
    """Everything between 'data is checked' and 'model folder verified', logged to ``tracker``.

    ``checkpoints``: resume from and write training checkpoints (peftflow.training.checkpoint);
    ``baseline``: the baseline run, which a task may compare itself with.
    """
    started = time.perf_counter()
    model, tokenizer, base = build_model(cfg, task.build_base)
    trainable, total = count_parameters(model)
    predicted = predicted_peak_memory_mb(model, cfg)
    log_base_reference(tracker, base, cfg)
    data = task.prepare(cfg, tokenizer, training_splits(cfg, splits))
    outcome = train_model(model, data.objective, cfg, epoch_logger(tracker), checkpoints)
    tracker.set_tags(outcome_tags(outcome, cfg))
    final = task.final_metrics(model, tokenizer, data, cfg, tracker, out_dir, baseline)
    final.update(outcome_metrics(trainable, total, outcome))
    tracker.log_metrics(final)
    # Logged, not returned: like peak_memory_mb they vary between processes (RSS on CPU).
    tracker.log_metrics(memory_prediction_metrics(predicted, outcome.peak_memory_mb))
    tracker.log_dict({"history": outcome.history}, "history.json")
    model_dir = save_model(model, tokenizer, cfg, base, task.labels(cfg), out_dir / "model")
    task.verify_reload(model, data, model_dir, cfg)
    tracker.set_tags({"peftflow.reload_check": "passed"})
    tracker.log_artifact(model_dir, "model_folder")
    # The stage's compute from model load to the verified folder (train_seconds: epochs only).
    final["run_seconds"] = time.perf_counter() - started
    tracker.log_metrics({"run_seconds": final["run_seconds"]})
    return TrainedModel(final, str(model_dir), outcome.history)


def train_replica(task: TaskKind, cfg: ExperimentConfig, splits: dict[str, pd.DataFrame]) -> None:
    """A data-parallel rank other than 0: the same model, data and loop; it logs nothing."""
    model, tokenizer, _ = build_model(cfg, task.build_base)
    data = task.prepare(cfg, tokenizer, training_splits(cfg, splits))
    train_model(model, data.objective, cfg, on_epoch=None)


def training_splits(cfg: ExperimentConfig, splits: dict[str, pd.DataFrame]) -> dict:
    """The splits a run trains on: train cut to ``train.max_examples`` (val and test whole)."""
    cap = cfg.train.max_examples
    if cap is None:
        return splits
    return {**splits, "train": sample_train(splits["train"], cap, cfg.seed)}


def build_untouched(
    task: TaskKind, cfg: ExperimentConfig
) -> tuple[nn.Module, object, ResolvedModel]:
    """The base model of ``cfg`` without its method, on the training device."""
    model, tokenizer, base = build_model(cfg, task.build_base, with_method=False)
    return model.to(pick_device(cfg.train.device)), tokenizer, base


def reload(task: TaskKind, model_dir: Path, device: str = "cpu") -> LoadedModel:
    """A saved model folder rebuilt by its task (the pinned base, the method, the tensors)."""
    return load_model(model_dir, task.build_base, device)


def log_base_reference(tracker: RunTracker, base: ResolvedModel, cfg: ExperimentConfig) -> None:
    """Where the base weights came from, pinned by fingerprint (tags) and location (params)."""
    tracker.set_tags(
        {
            "peftflow.base_fingerprint": base.fingerprint,
            "peftflow.base_source": base.source,
            "peftflow.base_weights": base_reference(base, cfg)["weights"],
            "peftflow.base_revision": base.pinned_revision(),
        }
    )
    tracker.log_params({"base.location": base.location, "base.package": base.package_version or ""})


def epoch_logger(tracker: RunTracker):
    """Curves live under epoch/...; the un-prefixed names hold the final (best-epoch) values."""

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics({f"epoch/{k}": v for k, v in metrics.items() if k != "epoch"}, epoch)

    return log_epoch


def outcome_tags(outcome: TrainOutcome, cfg: ExperimentConfig) -> dict[str, str]:
    """Where and how a run trained: the device, the precision ``train.precision`` resolved to
    there, the C allocator (which decides how far a CPU run's RSS exceeds its live memory,
    docs/memory.md) and, data-parallel, the replicas."""
    tags = {
        "peftflow.device": outcome.device,
        "peftflow.precision": precision_mode(cfg, torch.device(outcome.device).type),
        "peftflow.allocator": loaded_allocator(),
    }
    if outcome.processes > 1:
        tags.update(
            {
                "peftflow.ddp.processes": str(outcome.processes),
                "peftflow.ddp.backend": outcome.backend,
                "peftflow.ddp.replicas_in_sync": "true",  # train_model raises otherwise
            }
        )
    return tags


def outcome_metrics(trainable: int, total: int, outcome: TrainOutcome) -> dict[str, float]:
    """Size, speed and memory of a training run: the same names for every task."""
    return {
        "trainable_params": float(trainable),
        "total_params": float(total),
        "trainable_percent": 100.0 * trainable / total,
        "train_seconds": outcome.train_seconds,
        "train_examples_per_second": outcome.examples_per_second,
        "train_tokens_per_second": outcome.tokens_per_second,
        "peak_memory_mb": outcome.peak_memory_mb,
        "best_epoch": float(outcome.best_epoch),
    }


def predicted_peak_memory_mb(model: nn.Module, cfg: ExperimentConfig) -> float:
    """peftflow's memory estimate for the built model, before it trains (MiB).

    On CPU the measured peak is the process's peak RSS, so the runtime term is what the
    process holds now (libraries, data, tokenizer) less the model's weights, which
    the estimate counts itself; on CUDA both sides count tensors only.
    """
    runtime = runtime_baseline_bytes(estimate_device(cfg))
    if runtime:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        runtime = max(runtime - weights, 0.0)
    return estimate_for_model(model, cfg, runtime_bytes=runtime).total_mb


def memory_prediction_metrics(predicted_mb: float, measured_mb: float) -> dict[str, float]:
    """Predicted peak memory next to the measured ``peak_memory_mb``, and their ratio."""
    return {
        "predicted_peak_memory_mb": predicted_mb,
        "peak_memory_predicted_over_measured": predicted_mb / measured_mb if measured_mb else 0.0,
    }
