"""Pick a winner among the runs of one MLflow experiment: a ranked table, Pareto fronts, a report.

Runs are read through an explicit :class:`mlflow.MlflowClient` (never MLflow's global URIs).
Fine-tuned runs (tag ``peftflow.kind=finetune``, FINISHED) are ranked on one higher-is-better
test metric; baselines (``kind=baseline``) are references, not contenders; study parents and
earlier comparisons are ignored. A run is on the Pareto front of a cost (trainable %, train
time, peak memory) when no other run is at least as cheap and at least as good, and strictly
one of the two: those are the runs worth choosing between.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import groupby
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from peftflow.errors import PeftflowError
from peftflow.fsutil import atomic_folder
from peftflow.plots import CostAxis, MetricAxis, Reference, scatter_metric
from peftflow.registry import TASK_METRICS
from peftflow.report import MISSING, markdown_table
from peftflow.tracking import RUN_KEY_TAG, RunTracker

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
COST_HEADERS = {
    "trainable_percent": ("trainable %", "front %"),
    "train_seconds": ("train time (s)", "front time"),
    "peak_memory_mb": ("peak memory (MB)", "front memory"),
}
COST_FORMATS = {"trainable_percent": ".3g", "train_seconds": ",.1f", "peak_memory_mb": ",.0f"}
REPORT_FILE, CSV_FILE = "report.md", "comparison.csv"
PLOT_FILES = {cost: f"metric_vs_{cost}.png" for cost in COSTS}
REPORT_FILES = frozenset({REPORT_FILE, CSV_FILE, *PLOT_FILES.values()})
# Fractions (0-1) are shown as percentages; BLEU, chrF and ROUGE are logged as 0-100 already.
FRACTION_METRICS = ("accuracy", "precision", "recall", "f1")
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


# --- Pareto fronts ----------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """Per (cost, metric) point: True when no other point has cost <= and metric >=, one strictly.

    Points missing either value are never on the front. Identical points do not dominate each
    other, so ties stay on the front together. Sorting by cost makes this O(n log n).
    """
    on_front = [False] * len(points)
    known = sorted(
        (cost, metric, index)
        for index, (cost, metric) in enumerate(points)
        if cost is not None and metric is not None
    )
    best_cheaper = float("-inf")  # best metric among strictly cheaper points
    for _, same_cost in groupby(known, key=lambda point: point[0]):
        same_cost = list(same_cost)
        best_here = max(metric for _, metric, _ in same_cost)
        for _, metric, index in same_cost:
            on_front[index] = metric == best_here and metric > best_cheaper
        best_cheaper = max(best_cheaper, best_here)
    return on_front


def pareto_fronts(rows: Sequence[RunRow]) -> dict[str, frozenset[str]]:
    """Cost -> ids of the rows on that cost's front (rows lacking the cost are never on it)."""
    fronts = {}
    for cost in COSTS:
        flags = pareto_front([(getattr(row, cost), row.metric) for row in rows])
        fronts[cost] = frozenset(row.run_id for row, flag in zip(rows, flags, strict=True) if flag)
    return fronts


# --- reading the experiment --------------------------------------------------------------------


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


# --- the table --------------------------------------------------------------------------------


def is_fraction(metric: str) -> bool:
    """Accuracy-like metrics are logged as 0-1 fractions (shown as %); BLEU & co. as 0-100."""
    return metric.rsplit("_", 1)[-1].lower() in FRACTION_METRICS


def metric_axis(metric: str) -> MetricAxis:
    """The plots' y axis: the row's ``metric`` value, in percent for fraction metrics."""
    if is_fraction(metric):
        return MetricAxis("metric", f"{metric} (%)", scale=100)
    return MetricAxis("metric", metric)


def _format(value: float | None, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def table_headers(comparison: Comparison) -> list[str]:
    costs = [COST_HEADERS[cost][0] for cost in COSTS]
    fronts = [COST_HEADERS[cost][1] for cost in COSTS]
    return ["#", "run", "method", "base model", comparison.metric, *costs, *fronts, "run id"]


def table_cells(comparison: Comparison) -> list[list[str]]:
    """One list of cells per ranked run, best first; ``*`` marks a run on a cost's front."""
    cells = []
    for rank, row in enumerate(comparison.ranked, start=1):
        marks = ["*" if row.run_id in comparison.fronts[cost] else "" for cost in COSTS]
        identity = [str(rank), row.run_name, row.method or MISSING, row.base_model or MISSING]
        costs = [_format(getattr(row, cost), COST_FORMATS[cost]) for cost in COSTS]
        cells.append([*identity, _format(row.metric, ".4f"), *costs, *marks, row.run_id[:8]])
    return cells


def fixed_width_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    columns = list(zip(headers, *cells, strict=True))
    widths = [max(len(text) for text in column) for column in columns]
    numeric = [all(_looks_numeric(text) for text in column[1:]) for column in columns]

    def line(values: Sequence[str]) -> str:
        padded = [
            text.rjust(width) if right else text.ljust(width)
            for text, width, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(values) for values in cells)])


def _looks_numeric(text: str) -> bool:
    return text == MISSING or re.fullmatch(r"[-+]?[\d.,]+(e[-+]?\d+)?", text) is not None


def summary_text(comparison: Comparison) -> str:
    """What ``peftflow compare`` prints: the ranked table, then references and left-out runs."""
    lines = [
        f"experiment {comparison.experiment}: {len(comparison.ranked)} run(s) ranked on "
        f"{comparison.metric} (higher is better); * = on the Pareto front of that cost",
        fixed_width_table(table_headers(comparison), table_cells(comparison)),
    ]
    for baseline in comparison.baselines:
        lines.append(f"baseline {baseline.run_name}: {comparison.metric} {baseline.metric:.4f}")
    if comparison.skipped:
        names = ", ".join(row.run_name for row in comparison.skipped)
        lines.append(f"skipped (no {comparison.metric}): {len(comparison.skipped)}: {names}")
    if comparison.dropped:
        lines.append(
            f"dropped {len(comparison.dropped)} older run(s) of a retrained run key "
            "(the newest run of each key is kept)"
        )
    return "\n".join(lines)


# --- the report ---------------------------------------------------------------------------------


def render_markdown(comparison: Comparison, command: str) -> str:
    """report.md: header, ranked table, fronts, references, left-out runs, plots."""
    lines = [f"# Comparison of experiment `{comparison.experiment}`", "", *_header(comparison)]
    lines += [f"- Command: `{command}`", "", "## Runs, best first", ""]
    lines += markdown_table(table_headers(comparison), table_cells(comparison))
    lines += ["", "`*`: on the Pareto front of that cost (no run is as cheap and as good).", ""]
    lines += ["## Pareto fronts", "", *_front_lines(comparison), ""]
    lines += ["## Baselines (references, not ranked)", "", *_baseline_lines(comparison), ""]
    lines += ["## Runs left out", "", *_left_out_lines(comparison), "", "## Plots", ""]
    for axis in COST_AXES:
        lines += [f"![{comparison.metric} vs {axis.label}]({PLOT_FILES[axis.key]})", ""]
    return "\n".join(lines)


def _header(comparison: Comparison) -> list[str]:
    task = comparison.task or "several (one metric for all)"
    return [
        f"- Experiment: `{comparison.experiment}` (id {comparison.experiment_id})",
        f"- Tracking URI: `{comparison.tracking_uri}`",
        f"- Date: {comparison.created:%Y-%m-%d %H:%M:%S} UTC",
        f"- Metric: `{comparison.metric}` (higher is better); task: {task}",
        f"- Runs ranked: {len(comparison.ranked)}, skipped: {len(comparison.skipped)}, "
        f"dropped as older duplicates: {len(comparison.dropped)}",
    ]


def _front_lines(comparison: Comparison) -> list[str]:
    """Per cost, its front from cheapest to dearest (each step buys more metric)."""
    lines = []
    for axis in COST_AXES:
        front = [row for row in comparison.ranked if row.run_id in comparison.fronts[axis.key]]
        front.sort(key=lambda row: (getattr(row, axis.key), -row.metric))
        points = ", ".join(
            f"`{row.run_name}` ({_format(getattr(row, axis.key), COST_FORMATS[axis.key])} → "
            f"{row.metric:.4f})"
            for row in front
        )
        lines.append(f"- {axis.label}: {points or f'none (no ranked run logged {axis.key})'}")
    return lines


def _baseline_lines(comparison: Comparison) -> list[str]:
    if not comparison.baselines:
        return [f"None logged `{comparison.metric}` in this experiment."]
    rows = [
        [row.run_name, row.method, row.task, f"{row.metric:.4f}", row.run_id[:8]]
        for row in comparison.baselines
    ]
    return markdown_table(["run", "method", "task", comparison.metric, "run id"], rows)


def _left_out_lines(comparison: Comparison) -> list[str]:
    lines = [
        f"- skipped `{row.run_name}` (`{row.run_id[:8]}`): `{comparison.metric}` missing or "
        f"not finite (it has: {', '.join(row.logged_metrics) or 'no metrics'})"
        for row in comparison.skipped
    ]
    lines += [
        f"- dropped `{row.run_name}` (`{row.run_id[:8]}`, started {_when(row)}): an older run "
        f"of run key `{row.run_key}`, which was trained again"
        for row in comparison.dropped
    ]
    return lines or ["None: every finished fine-tune run is ranked."]


def _when(row: RunRow) -> str:
    return f"{datetime.fromtimestamp(row.start_time / 1000, UTC):%Y-%m-%d %H:%M:%S} UTC"


CSV_COLUMNS = (
    "role",
    "run_id",
    "run_name",
    "method",
    "base_model",
    "task",
    "metric",
    *COSTS,
    *(f"on_front_{cost}" for cost in COSTS),
    "start_time_utc",
    "run_key",
)


def write_csv(comparison: Comparison, path: Path) -> Path:
    """Every row read, by role (ranked/skipped/dropped/baseline), with its front flags."""
    roles = (("ranked", comparison.ranked), ("skipped", comparison.skipped))
    roles += (("dropped", comparison.dropped), ("baseline", comparison.baselines))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = list(CSV_COLUMNS)
        header[header.index("metric")] = comparison.metric
        writer.writerow(header)
        for role, rows in roles:
            for row in rows:
                writer.writerow(_csv_values(comparison, role, row))
    return path


def _csv_values(comparison: Comparison, role: str, row: RunRow) -> list[Any]:
    identity = [role, row.run_id, row.run_name, row.method, row.base_model, row.task, row.metric]
    costs = [getattr(row, cost) for cost in COSTS]
    flags = [row.run_id in comparison.fronts[cost] for cost in COSTS]
    started = datetime.fromtimestamp(row.start_time / 1000, UTC).isoformat(timespec="seconds")
    return [*identity, *costs, *flags, started, row.run_key or ""]


def plot_fronts(comparison: Comparison, folder: Path) -> list[Path]:
    """The metric against each cost: fronts highlighted, baselines as dashed lines."""
    rows = [asdict(row) for row in comparison.ranked]
    references = [Reference(f"baseline: {b.method}", b.metric) for b in comparison.baselines]
    paths = []
    for axis in COST_AXES:
        front = [row for row in rows if row["run_id"] in comparison.fronts[axis.key]]
        path = folder / PLOT_FILES[axis.key]
        paths.append(
            scatter_metric(
                rows, metric_axis(comparison.metric), axis, path, "run_name", front, references
            )
        )
    return paths


def write_report(comparison: Comparison, out_dir: Path, command: str) -> list[Path]:
    """report.md, comparison.csv and the three PNGs, all or nothing: built in a staging folder
    that replaces ``out_dir`` only once every file is written."""
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    with atomic_folder(out_dir) as staging:
        (staging / REPORT_FILE).write_text(render_markdown(comparison, command))
        write_csv(comparison, staging / CSV_FILE)
        plot_fronts(comparison, staging)
    return [out_dir / REPORT_FILE, out_dir / CSV_FILE, *(out_dir / PLOT_FILES[c] for c in COSTS)]


def _check_replaceable(out_dir: Path) -> None:
    """The report replaces ``out_dir`` whole, so refuse a folder holding anything else."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CompareError(f"--out {out_dir} is a file; pass a folder for the report.")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in REPORT_FILES)
    if foreign:
        raise CompareError(
            f"--out {out_dir} holds files that are not a comparison report "
            f"({', '.join(foreign[:5])}); it would be replaced whole. Pass a new or empty folder."
        )


def default_out_dir(root: Path, experiment: str) -> Path:
    """``<root>/outputs/compare/<experiment>``, the name made path-safe."""
    return Path(root) / "outputs" / "compare" / re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)


# --- logging ------------------------------------------------------------------------------------


def log_comparison(comparison: Comparison, report_dir: Path) -> str:
    """A new run in the same experiment holding the report (artifacts under ``comparison/``)."""
    tags = {
        KIND_TAG: COMPARISON,
        METRIC_TAG: comparison.metric,
        "peftflow.compare.best_run_id": comparison.ranked[0].run_id,
    }
    params = {"n_runs": len(comparison.ranked), "metric": comparison.metric}
    name = f"compare-{comparison.created:%Y%m%dT%H%M%SZ}"
    with RunTracker(comparison.tracking_uri) as tracker:
        run_id = tracker.start(comparison.experiment_id, name, tags, params)
        for path in sorted(Path(report_dir).iterdir()):
            tracker.log_artifact(path, "comparison")
    return run_id


@dataclass(frozen=True)
class CompareOutcome:
    comparison: Comparison
    report_paths: list[Path]
    run_id: str | None


def run_compare(
    experiment: str,
    tracking_uri: str,
    out_dir: Path,
    command: str,
    metric: str | None = None,
    task: str | None = None,
    log: bool = True,
) -> CompareOutcome:
    """Collect, write the report to ``out_dir`` and (unless ``log`` is False) log it to MLflow."""
    comparison = collect(experiment, tracking_uri, metric, task)
    paths = write_report(comparison, out_dir, command)
    run_id = log_comparison(comparison, out_dir) if log else None
    return CompareOutcome(comparison, paths, run_id)
