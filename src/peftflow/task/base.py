"""The task seam: what differs between classification and generation, as one small interface.

The pipeline, the training run, the data-parallel replicas, serving and the memory
estimate talk to a :class:`TaskKind` only; ``cfg.task`` is read once, in
:func:`peftflow.task.registry.task_for`, to choose the implementation
(:mod:`.classification` or :mod:`.generation`). An implementation says:

- how the ingested table looks to it, which data checks it runs, how it splits;
- which model it trains (a classifier over a backbone, or a causal LM);
- how a batch is encoded and what the loss is (its training :class:`Prepared` data);
- how a trained model is scored and checked after saving;
- what its baseline is (TF-IDF + logistic regression, or the untouched base zero-shot);
- its serving contract (input example, outputs, rows a logged model must reproduce).

Depends on: config, checks, models, training, tracking.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
from torch import nn

from peftflow.checks.report import CheckReport
from peftflow.config import DataConfig, ExperimentConfig, ModelConfig
from peftflow.models.assets import ResolvedModel
from peftflow.models.saved import LoadedModel
from peftflow.tracking.runs import RunTracker
from peftflow.training.objective import Objective


class Prepared(Protocol):
    """A task's encoded splits for one run, and the objective the loop minimises."""

    objective: Objective


class TaskKind(ABC):
    """One kind of task: its data view, checks, model, loss, scoring, baseline and serving."""

    name: str
    # How load_dataset reads a user's table for this task: labelled texts or pairs.
    table_layout: str
    # Shown as the example input of the registered model, and its first check row.
    input_example: str
    # Test rows the logged model must reproduce before it is registered.
    logged_check_rows: int
    # (header, metric) columns of the command line's summary table.
    summary_columns: tuple[tuple[str, str], ...]
    baseline_label: str  # the baseline's row in summaries
    baseline_run_name: str  # its MLflow run's name

    # --- data -------------------------------------------------------------------------------

    def view(self, table: pd.DataFrame) -> pd.DataFrame:
        """The ingested table as this task sees it (the raw checks and the split run on it)."""
        return table

    @abstractmethod
    def raw_report(self, view: pd.DataFrame, data: DataConfig) -> CheckReport:
        """The raw-data suite on the task's view of the table."""

    @abstractmethod
    def split(self, view: pd.DataFrame, cfg: ExperimentConfig) -> dict[str, pd.DataFrame]:
        """Deterministic train/val/test frames (same view, config and seed: same split)."""

    @abstractmethod
    def split_summary(self, splits: dict[str, pd.DataFrame]) -> dict:
        """Rows per split and what else a reader should see of the split."""

    @abstractmethod
    def split_report(self, splits: dict[str, pd.DataFrame]) -> CheckReport:
        """The leakage suite over the three splits."""

    @abstractmethod
    def tokenisation_report(
        self, cfg: ExperimentConfig, splits: dict[str, pd.DataFrame]
    ) -> tuple[CheckReport, dict[str, Any]]:
        """The tokenisation suite and what it observed (token lengths, template)."""

    # --- model ------------------------------------------------------------------------------

    @abstractmethod
    def check_knobs(self, model_cfg: ModelConfig, family: str) -> None:
        """Raise ConfigError for model knobs that mean nothing (or are wrong) for this task."""

    @abstractmethod
    def build_base(self, base: ResolvedModel, cfg: ExperimentConfig, tokenizer) -> nn.Module:
        """The model before any method is applied (seeded, so a reload rebuilds it exactly)."""

    @abstractmethod
    def architecture(self, base: ResolvedModel, cfg: ExperimentConfig) -> nn.Module:
        """The same model from its config alone (no weights read), for the memory estimate."""

    def labels(self, cfg: ExperimentConfig) -> list[str]:
        """Output class names in logit order, saved with the model ([] when none)."""
        return []

    # --- training and evaluation ------------------------------------------------------------

    @abstractmethod
    def prepare(
        self, cfg: ExperimentConfig, tokenizer, splits: dict[str, pd.DataFrame]
    ) -> Prepared:
        """Encode the splits and build the objective (the same on every data-parallel rank)."""

    @abstractmethod
    def final_metrics(
        self,
        model: nn.Module,
        tokenizer,
        data: Prepared,
        cfg: ExperimentConfig,
        tracker: RunTracker,
        out_dir: Path,
        baseline: Any | None,
    ) -> dict[str, float]:
        """Val and test metrics of the trained weights; logs the task's own artifacts."""

    @abstractmethod
    def verify_reload(
        self, model: nn.Module, data: Prepared, model_dir: Path, cfg: ExperimentConfig
    ) -> None:
        """Reload the saved folder from scratch; raise RegistryError unless it computes the same."""

    # --- baseline ---------------------------------------------------------------------------

    @abstractmethod
    def baseline_key(self, cfg: ExperimentConfig, data_md5: str) -> str:
        """Everything the baseline's scores depend on, as its run's cache key."""

    @abstractmethod
    def run_baseline(
        self, cfg: ExperimentConfig, splits: dict[str, pd.DataFrame], tracker, out_dir: Path
    ) -> dict[str, float]:
        """Score the baseline on the split inside the open ``tracker`` run; its metrics."""

    @abstractmethod
    def baseline_tags(self, cfg: ExperimentConfig) -> dict[str, str]:
        """What the baseline run is (``peftflow.method``) and what it ran on."""

    def baseline_params(self, cfg: ExperimentConfig) -> dict[str, Any]:
        return {"seed": cfg.seed}

    def baseline_predictions(self, out_dir: Path) -> str | None:
        """The baseline's saved predictions, when fine-tuned runs show them next to theirs."""
        return None

    # --- serving ----------------------------------------------------------------------------

    @abstractmethod
    def predict(self, loaded: LoadedModel, texts: Sequence[str]) -> pd.DataFrame:
        """One output row per input text: the serving contract of the registered model."""

    @abstractmethod
    def check_texts(self, test_split: pd.DataFrame) -> list[str]:
        """The inputs of the first test rows, as the served model receives them."""
