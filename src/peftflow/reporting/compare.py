"""The comparison of an experiment's runs, written: a fixed-width table, a markdown report, a
CSV, one plot per cost, and an MLflow run of kind ``comparison`` that holds them.

Depends on: tracking.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from peftflow.fsutil import atomic_folder
from peftflow.reporting.comparison import (
    COMPARISON,
    COST_AXES,
    COSTS,
    KIND_TAG,
    METRIC_TAG,
    CompareError,
    Comparison,
    RunRow,
    collect,
)
from peftflow.reporting.plots import MetricAxis, Reference, scatter_metric
from peftflow.reporting.study_report import MISSING, markdown_table
from peftflow.tracking.runs import RunTracker

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
