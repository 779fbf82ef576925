"""The memory estimate of a config, before any weights are read (``peftflow estimate``).

The task's model is built on the meta device from the base's config alone, the method
applied, and :mod:`peftflow.training.estimate` counts parameters, optimizer state,
gradients and activations.

Depends on: config, models, training.
"""

from __future__ import annotations

import torch
from torch import nn

from peftflow.config import ExperimentConfig
from peftflow.models.assets import resolve_model
from peftflow.models.methods.registry import apply_method
from peftflow.models.saved import build_model
from peftflow.task.registry import task_for
from peftflow.training.estimate import (
    MemoryEstimate,
    estimate_device,
    estimate_for_model,
    runtime_baseline_bytes,
)


def meta_model(cfg: ExperimentConfig) -> tuple[nn.Module, str]:
    """The model the run would train, built without weights; (model, "meta" or "cpu").

    Falls back to a random-init CPU build where a method needs real tensors to be
    applied (e.g. prompt tuning initialised from text).
    """
    task = task_for(cfg)
    base = resolve_model(cfg.model.name, cfg.model.revision)
    try:
        with torch.device("meta"):
            model = apply_method(task.architecture(base, cfg), cfg.method, base.family)
        return model, "meta"
    except (NotImplementedError, RuntimeError):
        random_model = cfg.model.model_copy(update={"pretrained": False})
        random_cfg = cfg.model_copy(update={"model": random_model})
        return build_model(random_cfg, task.build_base)[0], "cpu"


def estimate_config(cfg: ExperimentConfig, batch_size: int | None = None) -> MemoryEstimate:
    """Predict the peak training memory of ``cfg`` without loading any weights."""
    baseline = runtime_baseline_bytes(estimate_device(cfg))  # before any model exists
    model, built_on = meta_model(cfg)
    estimate = estimate_for_model(model, cfg, batch_size, runtime_bytes=baseline)
    estimate.notes.append(f"parameter counts from a model built on the {built_on} device")
    return estimate
