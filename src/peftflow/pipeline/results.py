"""What the stages hand each other: frozen, typed results, and the state that collects them.

Every stage fills one slot of :class:`PipelineState` (ingest fills two: the table and
the raw-data check that gated it). A slot that is already filled, given by the
caller (a study's shared split, a refresh's one ingest), is not computed again.
The check reports every run logs are collected in one place,
:attr:`PipelineState.report_paths`.

Depends on: config, models, tracking.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftflow.config import ExperimentConfig
from peftflow.models.facts import ModelFacts
from peftflow.tracking.promotion import PromotionDecision
from peftflow.tracking.registration import ModelVersionInfo
from peftflow.tracking.runs import RunResult


@dataclass(frozen=True)
class RunContext:
    """What every stage of one pipeline run reads besides the results before it.

    ``parent_run_id`` nests the MLflow runs under another (a study's run);
    ``extra_tags`` are set when the training run starts (a reproduction says so from
    its first second); ``reports_name`` names the folder of the check reports
    (default: the config's name); ``entry_point`` is what ran (a flow's
    ``file:function``), MLflow's source name on the runs (default: the command's name).
    """

    cfg: ExperimentConfig
    root: Path
    remote_url: str | None = None
    parent_run_id: str | None = None
    extra_tags: Mapping[str, str] = field(default_factory=dict)
    reports_name: str | None = None
    entry_point: str = ""

    def but(self, **changes: Any) -> RunContext:
        """A copy with ``changes`` (another config, a parent run, ...)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CheckOutcome:
    """A Great Expectations suite that passed: its name, its report files, what it observed."""

    suite: str
    report_paths: tuple[str, ...]
    observed: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ingested:
    """A data version: the DVC-tracked table and its md5."""

    data_md5: str
    table_path: str
    n_rows: int
    label_counts: Mapping[str, int]
    source: str


@dataclass(frozen=True)
class SplitResult:
    """The three split files (train/val/test parquet) and a summary of what is in them."""

    paths: Mapping[str, str]
    summary: Mapping[str, Any]


@dataclass(frozen=True)
class PipelineState:
    """The results so far; None where a stage has not run (or was skipped)."""

    facts: ModelFacts | None = None
    ingested: Ingested | None = None
    raw_check: CheckOutcome | None = None
    split: SplitResult | None = None
    split_check: CheckOutcome | None = None
    token_check: CheckOutcome | None = None
    baseline: RunResult | None = None
    trained: RunResult | None = None
    registered: ModelVersionInfo | None = None
    promotion: PromotionDecision | None = None

    @property
    def report_paths(self) -> list[str]:
        """Every data check's report, in pipeline order: what a training run logs."""
        checks = (self.raw_check, self.split_check, self.token_check)
        return [path for check in checks if check is not None for path in check.report_paths]

    @property
    def data_md5(self) -> str:
        if self.ingested is None:
            raise ValueError("no data version yet: the ingest stage has not run")
        return self.ingested.data_md5

    def filled(self, slot: str) -> bool:
        return getattr(self, slot) is not None

    def with_results(self, results: Mapping[str, Any]) -> PipelineState:
        return dataclasses.replace(self, **results)
