"""Helpers for the training-fault tests, and the child process that is killed mid-epoch.

``python -m tests.reliability.faults RUN.json`` runs the pipeline's train stage for the
config, splits and root in RUN.json and SIGKILLs itself while it writes the checkpoint
named ``kill_while_writing`` (after its first tensor file, before the rest): the
harshest place to die, leaving a complete previous checkpoint and a half-written one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from peftflow.config.experiment import ExperimentConfig
from peftflow.config.loading import parse_config
from tests.conftest import synthetic_spam_table

DATA_MD5 = "0123456789abcdef0123456789abcdef"  # stands in for the DVC md5 of the data
TRAIN_ROWS = 48  # batch 8: 6 optimizer steps per epoch


def tiny_run_config(
    model_dir: Path, method: str = "lora", method_fields: dict | None = None, **train
) -> ExperimentConfig:
    """A tiny classifier run: 2 epochs x 6 steps, one thread (bit-exact), dropout on."""
    return parse_config(
        {
            "name": f"faults-{method}",
            "model": {"name": str(model_dir), "max_length": 32},
            "method": {"name": method, **(method_fields or {})},
            "train": {
                "epochs": 2,
                "batch_size": 8,
                "lr": 5e-3,
                "warmup_ratio": 0.0,
                "progress": False,
                "threads": 1,
                **train,
            },
        }
    )


def train_stage(cfg: ExperimentConfig, split_paths: dict[str, str], root: Path):
    """The pipeline's train stage on ready splits (as a flow runs it after the data checks)."""
    from peftflow.pipeline import stages
    from peftflow.pipeline.results import Ingested, PipelineState, RunContext, SplitResult

    state = PipelineState(
        ingested=Ingested(DATA_MD5, "", 0, {}, "test"), split=SplitResult(split_paths, {})
    )
    return stages.train(RunContext(cfg, Path(root)), state)


def with_tracking(cfg: ExperimentConfig, tracking_uri: str) -> ExperimentConfig:
    tracking = cfg.tracking.model_copy(update={"tracking_uri": tracking_uri})
    return cfg.model_copy(update={"tracking": tracking})


def write_splits(folder: Path) -> dict[str, str]:
    """train/val/test parquet files of the synthetic spam table (48/16/16 rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    table = synthetic_spam_table(TRAIN_ROWS + 32)
    parts = {"train": table[:TRAIN_ROWS], "val": table[TRAIN_ROWS:-16], "test": table[-16:]}
    paths = {}
    for name, frame in parts.items():
        paths[name] = str(folder / f"{name}.parquet")
        frame.reset_index(drop=True).to_parquet(paths[name], index=False)
    return paths


def fresh_store(empty_store: Path, root: Path) -> str:
    """A copy of the initialised MLflow sqlite store under ``root``; its URI."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_store, root / "mlflow.db")
    return f"sqlite:///{root / 'mlflow.db'}"


def nan_loss_at(objective, bad_call: int, on_bad: Callable[[], None] | None = None):
    """``objective`` whose ``bad_call``-th micro-batch loss (1-based) is NaN.

    With one micro-batch per optimizer step the call count is the global step.
    ``on_bad`` runs just before, while the weights are those after the previous step.
    """
    calls = {"n": 0}

    def summed_loss(model, idx, device):
        calls["n"] += 1
        loss = objective.summed_loss(model, idx, device)
        if calls["n"] != bad_call:
            return loss
        if on_bad is not None:
            on_bad()
        return loss * float("nan")

    return dataclasses.replace(objective, summed_loss=summed_loss)


class InfiniteGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), infinite gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


def infinite_gradient_at(objective, bad_call: int):
    """``objective`` whose ``bad_call``-th micro-batch has a finite loss but infinite grads."""
    calls = {"n": 0}

    def summed_loss(model, idx, device):
        calls["n"] += 1
        loss = objective.summed_loss(model, idx, device)
        return InfiniteGradient.apply(loss) if calls["n"] == bad_call else loss

    return dataclasses.replace(objective, summed_loss=summed_loss)


def trainable_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from peftflow.models.saved import WEIGHTS_FILE

    return load_file(str(Path(model_dir) / WEIGHTS_FILE))


# --- the child process ---------------------------------------------------------------------


def _die_while_writing(checkpoint_name: str) -> None:
    """SIGKILL this process after the first tensor file of ``checkpoint_name`` is written."""
    from peftflow.training import checkpoint

    real_save_file = checkpoint.save_file

    def save_file(tensors, path, *args, **kwargs):
        real_save_file(tensors, path, *args, **kwargs)
        if Path(path).parent.name.startswith(f"{checkpoint.STAGING_PREFIX}{checkpoint_name}"):
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save_file = save_file


def main(run_file: str) -> None:
    run = json.loads(Path(run_file).read_text())
    cfg = ExperimentConfig.model_validate(run["config"])
    _die_while_writing(run["kill_while_writing"])
    train_stage(cfg, run["split_paths"], Path(run["root"]))
    sys.exit("the training process was meant to be killed but finished")


if __name__ == "__main__":
    main(sys.argv[1])
