"""The tasks there are, the one place ``cfg.task`` is read to choose an implementation, and
building or reloading a config's model through its task.

Depends on: config, models.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from peftflow.config import ExperimentConfig
from peftflow.models.assets import ResolvedModel
from peftflow.models.saved import LoadedModel, build_model, save_model
from peftflow.task import inference
from peftflow.task.base import TaskKind
from peftflow.task.classification import Classification
from peftflow.task.generation import Generation

TASKS: dict[str, TaskKind] = {task.name: task for task in (Classification(), Generation())}


def task_for(cfg: ExperimentConfig) -> TaskKind:
    """The implementation of ``cfg``'s task (classification or generation)."""
    return TASKS[cfg.task]


def build_for_training(cfg: ExperimentConfig) -> tuple[nn.Module, object, ResolvedModel]:
    """(model, tokenizer, base) to train ``cfg``: its task's model with its method applied."""
    return build_model(cfg, task_for(cfg).build_base)


def load_trained(model_dir: Path, device: str = "cpu") -> LoadedModel:
    """A saved model folder (adapter or merged), rebuilt by the task it was trained for."""
    return inference.load(model_dir, device)


def save_trained(model: nn.Module, tokenizer, cfg: ExperimentConfig, base, out_dir: Path) -> Path:
    """Save a trained model folder with the labels of ``cfg``'s task (see models.saved)."""
    return save_model(model, tokenizer, cfg, base, task_for(cfg).labels(cfg), out_dir)
