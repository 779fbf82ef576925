"""A study's report: markdown tables and PNG plots built from plain result dicts.

Each result is one dict per variant (see :func:`peftflow.pipeline.study.variant_result`):
``variant``, ``questions`` (a list; empty for rows that only compare methods),
``in_methods_table``, ``model``, ``method``, ``settings``, ``note``, ``status``
(trained / cached / failed), ``error``, ``run_id`` and the metrics in
:data:`peftflow.pipeline.study.REPORT_METRICS` (None when unknown). Nothing here touches
MLflow or torch models, so the report is tested from hand-made dicts and can be
rebuilt from ``results.json``.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftflow.reporting.plots import CostAxis, MetricAxis, Reference, scatter_metric

REPORT_FILE = "report.md"
RESULTS_FILE = "results.json"
PLOT_VS_TRAINABLE = "test_f1_vs_trainable_percent.png"
PLOT_VS_TIME = "test_f1_vs_train_time.png"
MISSING = "—"

Row = Mapping[str, Any]


@dataclass(frozen=True)
class ReportHeader:
    """What a reader needs to reproduce or discount the numbers: where, when and how they ran."""

    study: str
    command: str
    description: str = ""
    budget: dict[str, Any] = field(default_factory=dict)
    skipped_methods: dict[str, str] = field(default_factory=dict)
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    machine: dict[str, str] = field(default_factory=lambda: machine_info())


def machine_info() -> dict[str, str]:
    """Platform, CPU count and the torch device training used (GPU name when there is one)."""
    import torch

    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_device": device,
    }


# --- formatting -------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.2f}%"


def _trainable(value: float | None) -> str:
    return MISSING if value is None else f"{value:.3g}%"


def _number(value: float | None, unit: str = "", digits: int = 1) -> str:
    return MISSING if value is None else f"{value:,.{digits}f}{unit}"


COLUMNS: tuple[tuple[str, Callable[[Row], str]], ...] = (
    ("test accuracy", lambda r: _percent(r.get("test_accuracy"))),
    ("test F1", lambda r: _percent(r.get("test_f1"))),
    ("trainable %", lambda r: _trainable(r.get("trainable_percent"))),
    ("train time", lambda r: _number(r.get("train_seconds"), " s")),
    ("examples/s", lambda r: _number(r.get("train_examples_per_second"))),
    ("peak memory", lambda r: _number(r.get("peak_memory_mb"), " MB", 0)),
)


def _status(row: Row) -> str:
    run = f" `{row['run_id'][:8]}`" if row.get("run_id") else ""
    if row.get("status") in ("failed", "crashed"):
        return f"{row['status']}: {row.get('error', '')}"
    return f"{row.get('status', MISSING)}{run}"


def _cell(text: str) -> str:
    """Markdown-table safe: one line, no column separators."""
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table's lines; cells are made single-line and ``|``-safe."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return lines


def _metric_cells(row: Row) -> list[str]:
    return [render(row) for _, render in COLUMNS]


# --- tables --------------------------------------------------------------------------------


def group_by_question(results: Sequence[Row]) -> dict[str, list[Row]]:
    """Question -> its rows, in the order questions first appear; a row may answer several."""
    groups: dict[str, list[Row]] = {}
    for row in results:
        for question in row.get("questions", ()):
            groups.setdefault(question, []).append(row)
    return groups


def questions_table(results: Sequence[Row], baseline: Row | None) -> list[str]:
    """Table 1: one row per variant, grouped by question, the baseline last."""
    headers = ["question", "variant", "model", "method", "settings"]
    headers += [name for name, _ in COLUMNS] + ["run"]
    rows = []
    for question, group in group_by_question(results).items():
        for position, row in enumerate(group):
            label = f"**{question}**" if position == 0 else ""
            identity = [label, row["variant"], row["model"], row["method"], row.get("settings", "")]
            rows.append(identity + _metric_cells(row) + [_status(row)])
    if baseline:
        rows.append(
            ["(bar to beat)", baseline["variant"], "—", baseline["method"], ""]
            + _metric_cells(baseline)
            + [_status(baseline)]
        )
    return markdown_table(headers, rows)


def methods_table(results: Sequence[Row], baseline: Row | None) -> list[str]:
    """Table 2: every registry method at the same budget, the baseline last."""
    headers = ["method", "variant", "model"] + [name for name, _ in COLUMNS] + ["run"]
    rows = [
        [row["method"], row["variant"], row["model"]] + _metric_cells(row) + [_status(row)]
        for row in results
        if row.get("in_methods_table")
    ]
    if baseline:
        rows.append(
            [baseline["method"], baseline["variant"], "—"]
            + _metric_cells(baseline)
            + [_status(baseline)]
        )
    return markdown_table(headers, rows)


def question_answers(results: Sequence[Row]) -> list[str]:
    """One line per question: the best and worst variant on test F1 and the gap between them."""
    lines = []
    for question, group in group_by_question(results).items():
        scored = [row for row in group if row.get("test_f1") is not None]
        if len(scored) < 2:
            lines.append(f"- **{question}** not enough finished variants to compare.")
            continue
        best = max(scored, key=lambda row: row["test_f1"])
        worst = min(scored, key=lambda row: row["test_f1"])
        gap = 100 * (best["test_f1"] - worst["test_f1"])
        lines.append(
            f"- **{question}** best `{best['variant']}` (test F1 {_percent(best['test_f1'])}, "
            f"trainable {_trainable(best.get('trainable_percent'))}), worst `{worst['variant']}` "
            f"({_percent(worst['test_f1'])}): a gap of {gap:.2f} F1 points."
        )
    notes = [f"- `{row['variant']}`: {row['note']}" for row in results if row.get("note")]
    return lines + (["", "Notes:", *notes] if notes else [])


# --- document ------------------------------------------------------------------------------


def render_markdown(header: ReportHeader, results: Sequence[Row], baseline: Row | None) -> str:
    """The whole report as markdown (plots referenced by their file names)."""
    lines = [f"# Study `{header.study}`", ""]
    if header.description:
        lines += [header.description.strip(), ""]
    lines += _header_lines(header)
    if group_by_question(results):
        lines += ["", "## Table 1: the questions", "", *questions_table(results, baseline)]
        lines += ["", "### Answers (from the numbers above)", "", *question_answers(results)]
    if any(row.get("in_methods_table") for row in results):
        lines += ["", "## Table 2: every method at the same budget", ""]
        lines += methods_table(results, baseline)
    if header.skipped_methods:
        skipped = ", ".join(f"`{m}` ({why})" for m, why in header.skipped_methods.items())
        lines += ["", f"Methods not run here: {skipped}."]
    lines += ["", "## Plots", "", f"![test F1 vs trainable %]({PLOT_VS_TRAINABLE})", ""]
    lines += [f"![test F1 vs train time]({PLOT_VS_TIME})", "", *_footnotes()]
    return "\n".join(lines) + "\n"


def _header_lines(header: ReportHeader) -> list[str]:
    machine = header.machine
    budget = ", ".join(f"`{key}={value}`" for key, value in header.budget.items()) or "none"
    return [
        f"- Date: {header.date}",
        f"- Command: `{header.command}`",
        f"- Machine: {machine.get('platform')}, {machine.get('processor')}, "
        f"{machine.get('cpu_count')} CPUs; torch {machine.get('torch')} on "
        f"{machine.get('torch_device')}; Python {machine.get('python')}",
        f"- Budget applied to every variant: {budget}",
    ]


def _footnotes() -> list[str]:
    return [
        "Trainable % counts parameters that receive gradients (the classification head included).",
        "Train time and examples/s cover the training epochs only (validation excluded).",
        "Peak memory is the process's peak RSS on CPU (torch's peak allocation on a GPU); the",
        "study runs every variant in one process and neither figure is reset between variants,",
        "so each row is an upper bound that includes the variants trained before it.",
        "A `cached` row was trained earlier with the identical run key (config + data) and is",
        "reported from its MLflow run, not retrained.",
    ]


# --- plots -----------------------------------------------------------------------------------


F1_AXIS = MetricAxis("test_f1", "test F1 (%)", scale=100)


def plot_metric_vs(
    results: Sequence[Row], baseline: Row | None, x_key: str, x_label: str, path: Path
) -> Path:
    """Scatter of test F1 against ``x_key`` (log scale), each point labelled with its variant."""
    references = []
    if baseline and baseline.get("test_f1") is not None:
        references.append(Reference(f"{baseline['method']} (baseline)", baseline["test_f1"]))
    cost = CostAxis(x_key, x_label, log=True)
    return scatter_metric(results, F1_AXIS, cost, path, "variant", references=references)


def write_report(
    header: ReportHeader, results: Sequence[Row], baseline: Row | None, out_dir: Path
) -> list[Path]:
    """report.md, results.json and the two PNGs under ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [
        plot_metric_vs(
            results,
            baseline,
            "trainable_percent",
            "trainable parameters (%)",
            out_dir / PLOT_VS_TRAINABLE,
        ),
        plot_metric_vs(
            results, baseline, "train_seconds", "train time (s)", out_dir / PLOT_VS_TIME
        ),
    ]
    report = out_dir / REPORT_FILE
    report.write_text(render_markdown(header, results, baseline))
    raw = out_dir / RESULTS_FILE
    payload = {"header": asdict(header), "results": list(results), "baseline": baseline}
    raw.write_text(json.dumps(payload, indent=2, default=str))
    return [report, raw, *plots]
