"""Pick a winner among the runs of one MLflow experiment: which runs compete, ranked, and the
Pareto fronts of metric against cost.

Runs are read through an explicit :class:`mlflow.MlflowClient` (never MLflow's global URIs).
Fine-tuned runs (tag ``peftflow.kind=finetune``, FINISHED) are ranked on one higher-is-better
test metric; baselines (``kind=baseline``) are references, not contenders; study parents and
earlier comparisons are ignored. A run is on the Pareto front of a cost (trainable %, train
time, peak memory) when no other run is at least as cheap and at least as good, and strictly
one of the two: those are the runs worth choosing between. :mod:`.compare` writes the report.

Depends on: config, tracking.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from peftflow.config import TASK_METRICS
from peftflow.errors import PeftflowError
from peftflow.reporting.plots import CostAxis, pareto_front
from peftflow.tracking.runs import RUN_KEY_TAG

KIND_TAG = "peftflow.kind"
FINETUNE, BASELINE, COMPARISON = "finetune", "baseline", "comparison"


METRIC_TAG = "peftflow.compare.metric"


DEFAULT_TASK = "classification"


# search_runs returns at most this many runs a call; larger experiments are paged.
PAGE_SIZE = 1000


COST_AXES = (
    CostAxis("trainable_percent", "trainable parameters (%)", log=True),
    CostAxis("train_seconds", "train time (s)", log=False),
    CostAxis("peak_memory_mb", "peak memory (MB)", log=False),
)


COSTS = tuple(axis.key for axis in COST_AXES)


LOWER_IS_BETTER = ("loss", "perplexity")


class CompareError(PeftflowError):
    """An experiment cannot be compared as asked (unknown, empty, ambiguous, wrong metric)."""


@dataclass(frozen=True)
class RunRow:
    """One run as the comparison sees it; a cost or the metric is None when the run lacks it."""

    run_id: str
    run_name: str
    method: str
    base_model: str
    task: str
    metric: float | None
    trainable_percent: float | None
    train_seconds: float | None
    peak_memory_mb: float | None
    start_time: int  # ms since the epoch, as MLflow stores it
    run_key: str | None = None
    logged_metrics: tuple[str, ...] = ()


@dataclass(frozen=True)
class Comparison:
    """Everything the table, the report and the MLflow run are built from."""

    experiment: str
    experiment_id: str
    tracking_uri: str
    metric: str
    task: str | None
    ranked: list[RunRow]  # runs with the metric, best first
    skipped: list[RunRow]  # runs without the metric
    dropped: list[RunRow]  # older runs of a run key that was trained again
    baselines: list[RunRow]  # references with the metric
    fronts: dict[str, frozenset[str]]  # cost -> ids of the runs on its front
    created: datetime = field(default_factory=lambda: datetime.now(UTC))


def pareto_fronts(rows: Sequence[RunRow]) -> dict[str, frozenset[str]]:
    """Cost -> ids of the rows on that cost's front (rows lacking the cost are never on it)."""
    fronts = {}
    for cost in COSTS:
        flags = pareto_front([(getattr(row, cost), row.metric) for row in rows])
        fronts[cost] = frozenset(row.run_id for row, flag in zip(rows, flags, strict=True) if flag)
    return fronts


def collect(
    experiment: str, tracking_uri: str, metric: str | None = None, task: str | None = None
) -> Comparison:
    """Read ``experiment``'s runs and rank its fine-tuned runs on ``metric`` (default: by task)."""
    with _readable_store(tracking_uri):
        client = MlflowClient(tracking_uri)
        experiment_id = _experiment_id(client, experiment, tracking_uri)
        runs = list(_all_runs(client, experiment_id))
    finetuned = _finished(runs, FINETUNE)
    if not finetuned:
        raise CompareError(_no_finetune_message(experiment, runs))
    finetuned = _of_task(finetuned, task, experiment)
    tasks = {_task(run) for run in finetuned}
    task = task or (next(iter(tasks)) if len(tasks) == 1 else None)
    metric = metric or _default_metric(tasks, experiment)
    _check_direction(metric)
    kept, dropped = newest_per_run_key([_row(run, metric) for run in finetuned])
    ranked = sorted(
        (r for r in kept if r.metric is not None), key=lambda r: (-r.metric, r.run_name)
    )
    if not ranked:
        raise CompareError(_missing_metric_message(experiment, metric, kept))
    return Comparison(
        experiment=experiment,
        experiment_id=experiment_id,
        tracking_uri=tracking_uri,
        metric=metric,
        task=task,
        ranked=ranked,
        skipped=[row for row in kept if row.metric is None],
        dropped=dropped,
        baselines=_baselines(runs, metric, task),
        fronts=pareto_fronts(ranked),
    )


@contextmanager
def _readable_store(tracking_uri: str) -> Iterator[None]:
    """MLflow's errors about the store itself, turned into one that names the option to fix."""
    try:
        yield
    except MlflowException as error:
        raise CompareError(
            f"cannot read the MLflow store {tracking_uri}: {error.message.strip()} "
            "Check --tracking-uri (or --root, whose mlflow.db is the default)."
        ) from None


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments(max_results=PAGE_SIZE))
        raise CompareError(
            f"MLflow experiment {name!r} not found in {tracking_uri}; it has: "
            f"{', '.join(names) or 'no experiments'}. Pass one of those to --experiment, "
            "or point --tracking-uri/--root at the store your runs went to."
        )
    if experiment.lifecycle_stage == "deleted":
        raise CompareError(
            f"MLflow experiment {name!r} is deleted; restore it with `mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}` before comparing its runs."
        )
    return experiment.experiment_id


def _all_runs(client: MlflowClient, experiment_id: str) -> Iterable[Run]:
    """Every active run of the experiment, page by page (an experiment may hold thousands)."""
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=PAGE_SIZE, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _finished(runs: Iterable[Run], kind: str) -> list[Run]:
    return [r for r in runs if r.data.tags.get(KIND_TAG) == kind and r.info.status == "FINISHED"]


def _task(run: Run) -> str:
    return run.data.tags.get("peftflow.task", DEFAULT_TASK)


def _row(run: Run, metric: str) -> RunRow:
    tags, metrics = run.data.tags, run.data.metrics
    return RunRow(
        run_id=run.info.run_id,
        run_name=run.info.run_name or run.info.run_id[:8],
        method=tags.get("peftflow.method", ""),
        base_model=tags.get("peftflow.base_model", ""),
        task=_task(run),
        metric=_finite(metrics.get(metric)),
        trainable_percent=_finite(metrics.get("trainable_percent")),
        train_seconds=_finite(metrics.get("train_seconds")),
        peak_memory_mb=_finite(metrics.get("peak_memory_mb")),
        start_time=run.info.start_time or 0,
        run_key=tags.get(RUN_KEY_TAG),
        logged_metrics=tuple(sorted(metrics)),
    )


def _finite(value: float | None) -> float | None:
    """NaN or infinite (a diverged run) can be neither ranked nor plotted: treated as missing."""
    return value if value is not None and math.isfinite(value) else None


def newest_per_run_key(rows: Sequence[RunRow]) -> tuple[list[RunRow], list[RunRow]]:
    """(kept, dropped): of the runs sharing a run key (forced retrains) only the newest is kept.

    Runs without a run key are all kept; the kept runs keep their input order.
    """
    newest: dict[str, RunRow] = {}
    for row in rows:
        if row.run_key and (
            row.run_key not in newest or row.start_time > newest[row.run_key].start_time
        ):
            newest[row.run_key] = row
    kept = [row for row in rows if not row.run_key or newest[row.run_key] is row]
    dropped = [row for row in rows if row.run_key and newest[row.run_key] is not row]
    return kept, dropped


def _of_task(runs: list[Run], task: str | None, experiment: str) -> list[Run]:
    if task is None:
        return runs
    matching = [run for run in runs if _task(run) == task]
    if not matching:
        found = ", ".join(sorted({_task(run) for run in runs}))
        raise CompareError(
            f"experiment {experiment!r} has no finished fine-tune runs of task {task!r}; "
            f"its tasks: {found}. Pass one of those to --task."
        )
    return matching


def _default_metric(tasks: set[str], experiment: str) -> str:
    """The task's metric (TASK_METRICS); several tasks have no common default, so ask."""
    if len(tasks) > 1:
        choices = "; ".join(
            f"--task {t} (metric {TASK_METRICS.get(t, 'unknown')})" for t in sorted(tasks)
        )
        raise CompareError(
            f"experiment {experiment!r} holds fine-tune runs of several tasks "
            f"({', '.join(sorted(tasks))}), which are scored on different metrics; "
            f"pass {choices}, or one metric for all with --metric."
        )
    (task,) = tasks
    if task not in TASK_METRICS:
        raise CompareError(
            f"task {task!r} has no default metric (known: {', '.join(TASK_METRICS)}); "
            "name the one to rank on with --metric."
        )
    return TASK_METRICS[task]


def _check_direction(metric: str) -> None:
    """Ranking and fronts assume higher is better; a loss would crown the worst run."""
    if any(word in metric.lower() for word in LOWER_IS_BETTER):
        raise CompareError(
            f"metric {metric!r} is lower-is-better, but compare ranks higher-is-better metrics; "
            f"choose a score such as {' or '.join(TASK_METRICS.values())} with --metric."
        )


def _baselines(runs: Iterable[Run], metric: str, task: str | None) -> list[RunRow]:
    """Finished baseline runs of ``task`` (any task when None) that logged ``metric``."""
    rows = [_row(run, metric) for run in _finished(runs, BASELINE)]
    rows, _ = newest_per_run_key(rows)
    return [r for r in rows if r.metric is not None and (task is None or r.task == task)]


def _no_finetune_message(experiment: str, runs: Sequence[Run]) -> str:
    held = Counter(f"{run.data.tags.get(KIND_TAG, 'untagged')} ({run.info.status})" for run in runs)
    holding = ", ".join(f"{count} {kind}" for kind, count in sorted(held.items())) or "no runs"
    return (
        f"experiment {experiment!r} has no FINISHED fine-tune runs (tag {KIND_TAG}=finetune); "
        f"it holds: {holding}. Train some first (`peftflow run -c CONFIG` or `peftflow study "
        "STUDY`), or pass the experiment they were logged to."
    )


def _missing_metric_message(experiment: str, metric: str, rows: Sequence[RunRow]) -> str:
    logged = sorted({name for row in rows for name in row.logged_metrics})
    return (
        f"no fine-tune run in experiment {experiment!r} logged metric {metric!r}; "
        f"they logged: {', '.join(logged) or 'no metrics'}. Pass one of those with --metric."
    )
