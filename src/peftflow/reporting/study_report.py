"""A study's report: markdown tables and PNG plots built from plain result dicts.

Each result is one dict per variant (see :func:`peftflow.pipeline.study.variant_result`):
``variant``, ``group`` (the variant as the study names it; its seeds' rows share it),
``seed``, ``reference``, ``questions`` (a list; empty for rows that only compare methods),
``in_methods_table``, ``model``, ``method``, ``settings``, ``note``, ``status``
(trained / cached / failed), ``error``, ``run_id`` and the metrics in
:data:`peftflow.pipeline.study.REPORT_METRICS` (None when unknown). Nothing here touches
MLflow or torch models, so the report is tested from hand-made dicts and can be
rebuilt from ``results.json``. Tables show one line per variant: the mean (± sd) over
its seeds. The answers come from ``evidence`` (see :mod:`peftflow.pipeline.study_evidence`):
each question's pairs with their paired bootstrap intervals.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftflow.reporting.plots import CostAxis, MetricAxis, Reference, pareto_front, scatter_metric

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
    seeds: list[int] = field(default_factory=list)
    reference_source: str = ""
    question_notes: dict[str, str] = field(default_factory=dict)
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


def _spread(row: Row, key: str) -> str:
    """``95.12% ± 0.40`` (sd over seeds, in points) or the single value."""
    sd = row.get(f"{key}_sd")
    value = _percent(row.get(key))
    return value if sd is None else f"{value} ± {100 * sd:.2f}"


COLUMNS: tuple[tuple[str, Callable[[Row], str]], ...] = (
    ("test accuracy", lambda r: _spread(r, "test_accuracy")),
    ("test F1", lambda r: _spread(r, "test_f1")),
    ("trainable %", lambda r: _trainable(r.get("trainable_percent"))),
    ("train time", lambda r: _number(r.get("train_seconds"), " s")),
    ("examples/s", lambda r: _number(r.get("train_examples_per_second"))),
    ("peak memory", lambda r: _number(r.get("peak_memory_mb"), " MB", 0)),
    ("predicted", lambda r: _number(r.get("predicted_peak_memory_mb"), " MB", 0)),
)
AVERAGED = (
    "test_accuracy",
    "test_f1",
    "trainable_percent",
    "trainable_params",
    "train_seconds",
    "train_examples_per_second",
    "predicted_peak_memory_mb",
)
NOT_TRAINED = ("failed", "crashed")


def _status(row: Row) -> str:
    if row.get("runs") is not None:  # a summary of one variant's seeds
        return row["status"]
    run = f" `{row['run_id'][:8]}`" if row.get("run_id") else ""
    if row.get("status") in NOT_TRAINED:
        return f"{row['status']}: {row.get('error', '')}"
    return f"{row.get('status', MISSING)}{run}"


# --- one line per variant --------------------------------------------------------------------


def summarise(results: Sequence[Row]) -> list[dict]:
    """One summary per variant (its seeds' rows pooled), in the order variants first appear.

    Metrics are the mean over the finished seeds, with ``<metric>_sd`` for test accuracy and
    F1 (two or more seeds); the peak memory is the highest seed's; ``run_seconds`` is summed.
    A study without seeds gets its rows back as they are (one run per variant).
    """
    groups: dict[str, list[Row]] = {}
    for row in results:
        groups.setdefault(row.get("group") or row["variant"], []).append(row)
    return [_summary(name, rows) for name, rows in groups.items()]


def _summary(name: str, rows: list[Row]) -> dict:
    first = rows[0]
    if len(rows) == 1 and first.get("seed") is None:
        return dict(first)
    done = [r for r in rows if r.get("status") not in NOT_TRAINED]
    summary = {
        k: first.get(k) for k in ("questions", "in_methods_table", "note", "model", "method")
    }
    summary |= {"variant": name, "group": name, "reference": first.get("reference")}
    summary["settings"] = _without_seed(first.get("settings", ""))
    summary["seeds"] = [r.get("seed") for r in done]
    summary["runs"] = [r.get("run_id") for r in done]
    for key in AVERAGED:
        values = [r[key] for r in done if r.get(key) is not None]
        summary[key] = statistics.fmean(values) if values else None
        if key in ("test_accuracy", "test_f1"):
            summary[f"{key}_sd"] = statistics.stdev(values) if len(values) >= 2 else None
    peaks = [r["peak_memory_mb"] for r in done if r.get("peak_memory_mb") is not None]
    summary["peak_memory_mb"] = max(peaks) if peaks else None
    summary["run_seconds"] = sum(r.get("run_seconds") or 0.0 for r in done)
    summary["status"] = _group_status(rows, done)
    return summary


def _group_status(rows: Sequence[Row], done: Sequence[Row]) -> str:
    cached = sum(r.get("status") == "cached" for r in done)
    words = [f"{len(done)}/{len(rows)} seeds"] + ([f"{cached} cached"] if cached else [])
    failures = [
        f"seed {r.get('seed')} {r['status']}: {r.get('error', '')}" for r in rows if r not in done
    ]
    return ", ".join(words + failures)


def _without_seed(settings: str) -> str:
    return ", ".join(part for part in settings.split(", ") if not part.startswith("train.seed="))


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
    """Table 1: one row per variant (mean ± sd over its seeds), grouped by question, the
    baseline last."""
    headers = ["question", "variant", "model", "method", "settings"]
    headers += [name for name, _ in COLUMNS] + ["runs"]
    rows = []
    for question, group in group_by_question(summarise(results)).items():
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
    headers = ["method", "variant", "model"] + [name for name, _ in COLUMNS] + ["runs"]
    rows = [
        [row["method"], row["variant"], row["model"]] + _metric_cells(row) + [_status(row)]
        for row in summarise(results)
        if row.get("in_methods_table")
    ]
    if baseline:
        rows.append(
            [baseline["method"], baseline["variant"], "—"]
            + _metric_cells(baseline)
            + [_status(baseline)]
        )
    return markdown_table(headers, rows)


def question_answers(
    results: Sequence[Row], evidence: Mapping[str, Any] | None = None, notes: Mapping[str, str] = {}
) -> list[str]:
    """One line per compared pair of each question (``evidence``); a question without pairs
    gets its best and worst variant on test F1 and the gap between them."""
    compared = _comparisons_by_question(evidence)
    lines = []
    for question, group in group_by_question(summarise(results)).items():
        if question in compared:
            lines.append(f"- **{question}**")
            lines += [f"  - {pair_answer(pair)}" for pair in compared[question]]
            if notes.get(question):
                lines.append(f"  - _{notes[question].strip()}_")
            continue
        lines.append(_best_and_worst(question, group))
    for question in [q for q in notes if q not in group_by_question(results)]:
        lines.append(f"- **{question}** not answered here: {notes[question].strip()}")
    notes_lines = [
        f"- `{row['variant']}`: {row['note']}" for row in summarise(results) if row.get("note")
    ]
    return lines + (["", "Notes:", *notes_lines] if notes_lines else [])


def _comparisons_by_question(evidence: Mapping[str, Any] | None) -> dict[str, list[Mapping]]:
    grouped: dict[str, list[Mapping]] = {}
    for pair in (evidence or {}).get("questions", []):
        grouped.setdefault(pair["question"], []).append(pair)
    return grouped


def _best_and_worst(question: str, group: Sequence[Row]) -> str:
    scored = [row for row in group if row.get("test_f1") is not None]
    if len(scored) < 2:
        return f"- **{question}** not enough finished variants to compare."
    best = max(scored, key=lambda row: row["test_f1"])
    worst = min(scored, key=lambda row: row["test_f1"])
    gap = 100 * (best["test_f1"] - worst["test_f1"])
    return (
        f"- **{question}** best `{best['variant']}` (test F1 {_percent(best['test_f1'])}, "
        f"trainable {_trainable(best.get('trainable_percent'))}), worst `{worst['variant']}` "
        f"({_percent(worst['test_f1'])}): a gap of {gap:.2f} F1 points."
    )


def pair_answer(pair: Mapping[str, Any]) -> str:
    """`a` vs `b`: the F1 difference, its interval, the verdict and what a costs against b."""
    a, b = f"`{pair['a']}`", f"`{pair['b']}`"
    if pair.get("missing"):
        return f"{a} vs {b}: not compared ({pair['missing']})."
    verdict = {
        "a": f"{a} is better",
        "b": f"{b} is better",
        "none": "**no difference at this budget** (the interval includes 0)",
    }[pair["verdict"]]
    seeds = pair.get("seeds") or {}
    text = (
        f"{a} vs {b}: test F1 {_percent(pair['a_mean'])} vs {_percent(pair['b_mean'])} "
        f"(mean of {seeds.get(pair['a'], 1)} and {seeds.get(pair['b'], 1)} seeds), "
        f"ΔF1 {100 * pair['delta']:+.2f} points, {pair['level']:.0%} CI "
        f"[{100 * pair['low']:+.2f}, {100 * pair['high']:+.2f}] (paired bootstrap over "
        f"{pair['n']} test emails): {verdict}."
    )
    costs = [
        f"{label} {a}/{b} = {_ratio(pair.get(key))}"
        for key, label in (
            ("trainable_ratio", "trainable parameters"),
            ("train_time_ratio", "train time"),
        )
        if pair.get(key) is not None
    ]
    return text + (" " + "; ".join(costs) + "." if costs else "")


def _ratio(value: float) -> str:
    return f"{value:.3g}x"


def reference_table(evidence: Mapping[str, Any] | None) -> list[str]:
    """Each compared pair with a reference result: theirs, ours, and whether they agree."""
    headers = ["question", "pair (a vs b)", "reference: a", "reference: b", "reference Δ accuracy"]
    headers += ["ours: ΔF1 (95% CI)", "direction"]
    rows = []
    for pair in (evidence or {}).get("questions", []):
        reference = pair.get("reference")
        if not reference or pair.get("missing"):
            continue
        ours = f"{100 * pair['delta']:+.2f} [{100 * pair['low']:+.2f}, {100 * pair['high']:+.2f}]"
        rows.append(
            [
                pair["question"],
                f"{pair['a']} vs {pair['b']}",
                f"{reference['a']['label']}: {_percent(reference['a']['accuracy'])}",
                f"{reference['b']['label']}: {_percent(reference['b']['accuracy'])}",
                f"{100 * reference['delta_accuracy']:+.2f}",
                ours,
                pair["agreement"],
            ]
        )
    return markdown_table(headers, rows) if rows else []


def baseline_answer(evidence: Mapping[str, Any] | None) -> str | None:
    """Whether the best variant reaches the TF-IDF baseline's F1, with its interval."""
    pair = (evidence or {}).get("baseline")
    if not pair:
        return None
    if pair.get("missing"):
        return f"The best variant was not compared with the baseline ({pair['missing']})."
    reaches = {
        "a": "is better than the baseline",
        "none": "reaches the baseline (no difference at this budget)",
        "b": "does **not** reach the baseline",
    }[pair["verdict"]]
    return (
        f"Best variant `{pair['a']}` (seed-mean test F1 {_percent(pair['a_mean'])}) against "
        f"`{pair['b']}` ({_percent(pair['b_mean'])}): ΔF1 {100 * pair['delta']:+.2f} points, "
        f"{pair['level']:.0%} CI [{100 * pair['low']:+.2f}, {100 * pair['high']:+.2f}]: "
        f"it {reaches}."
    )


def compute_line(results: Sequence[Row], baseline: Row | None) -> str:
    """The study's measured compute: every run's time from model load to verified folder."""
    runs = [r for r in results if r.get("run_seconds") is not None]
    if not runs:
        return "Compute: not recorded (runs logged no run_seconds)."
    total = sum(r["run_seconds"] for r in runs) + ((baseline or {}).get("train_seconds") or 0.0)
    return (
        f"Compute: {total / 60:.1f} min measured over {len(runs)} runs (each from model load "
        "to its verified saved folder: training, evaluation, saving) plus the baseline; "
        "data checks and process start-up are not included."
    )


# --- document ------------------------------------------------------------------------------


def render_markdown(
    header: ReportHeader,
    results: Sequence[Row],
    baseline: Row | None,
    evidence: Mapping[str, Any] | None = None,
) -> str:
    """The whole report as markdown (plots referenced by their file names)."""
    lines = [f"# Study `{header.study}`", ""]
    if header.description:
        lines += [header.description.strip(), ""]
    lines += _header_lines(header) + [f"- {compute_line(results, baseline)}"]
    if group_by_question(results):
        lines += ["", "## Answers", "", *question_answers(results, evidence, header.question_notes)]
        against = baseline_answer(evidence)
        lines += ["", against] if against else []
        lines += ["", "## Table 1: the questions", "", *questions_table(results, baseline)]
    references = reference_table(evidence)
    if references:
        lines += ["", "## The reference side by side", ""]
        lines += [header.reference_source.strip(), ""] if header.reference_source else []
        lines += references
    if any(row.get("in_methods_table") for row in results):
        lines += ["", "## Table 2: every method at the same budget", ""]
        lines += methods_table(results, baseline)
    if header.skipped_methods:
        skipped = ", ".join(f"`{m}` ({why})" for m, why in header.skipped_methods.items())
        lines += ["", f"Methods not run here: {skipped}."]
    lines += ["", "## Plots", "", f"![test F1 vs trainable %]({PLOT_VS_TRAINABLE})", ""]
    lines += [f"![test F1 vs train time]({PLOT_VS_TIME})", "", *_footnotes(header)]
    return "\n".join(lines) + "\n"


def _header_lines(header: ReportHeader) -> list[str]:
    machine = header.machine
    seeds = ", ".join(map(str, header.seeds)) or "one (the experiment seed)"
    budget = ", ".join(f"`{key}={value}`" for key, value in header.budget.items()) or "none"
    return [
        f"- Date: {header.date}",
        f"- Command: `{header.command}`",
        f"- Machine: {machine.get('platform')}, {machine.get('processor')}, "
        f"{machine.get('cpu_count')} CPUs; torch {machine.get('torch')} on "
        f"{machine.get('torch_device')}; Python {machine.get('python')}",
        f"- Budget applied to every variant: {budget}",
        f"- Training seeds per variant: {seeds} (one split for all; the seed sets "
        "initialisation, batch order and dropout)",
    ]


def _footnotes(header: ReportHeader) -> list[str]:
    return [
        "Trainable % counts parameters that receive gradients (the classification head included).",
        "Train time and examples/s cover the training epochs only (validation excluded).",
        "Test accuracy and F1 are the mean ± sd over a variant's seeds; an answer's interval is a",
        "paired bootstrap over the test emails of the seed-mean F1 difference.",
        "Peak memory is the highest seed's peak RSS on CPU (torch's peak allocation on a GPU);",
        "with `isolate: true` every run trains in a fresh process, so it is the run's own. The",
        "predicted column is `peftflow estimate`'s figure for the same config.",
        "A `cached` run was trained earlier with the identical run key (config + data) and is",
        "reported from its MLflow run, not retrained.",
    ]


# --- plots -----------------------------------------------------------------------------------


F1_AXIS = MetricAxis("test_f1", "test F1 (%)", scale=100)


def plot_metric_vs(
    results: Sequence[Row], baseline: Row | None, x_key: str, x_label: str, path: Path
) -> Path:
    """Test F1 (mean ± sd over seeds) against ``x_key`` (log scale), one labelled point per
    variant, the Pareto front (highest F1 for its cost) marked."""
    references = []
    if baseline and baseline.get("test_f1") is not None:
        references.append(Reference(f"{baseline['method']} (baseline)", baseline["test_f1"]))
    cost = CostAxis(x_key, x_label, log=True)
    rows = summarise(results)
    on_front = pareto_front([(row.get(x_key), row.get("test_f1")) for row in rows])
    front = [row for row, on in zip(rows, on_front, strict=True) if on]
    return scatter_metric(
        rows, F1_AXIS, cost, path, "variant", front, references, error_key="test_f1_sd"
    )


def write_report(
    header: ReportHeader,
    results: Sequence[Row],
    baseline: Row | None,
    out_dir: Path,
    evidence: Mapping[str, Any] | None = None,
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
    report.write_text(render_markdown(header, results, baseline, evidence))
    raw = out_dir / RESULTS_FILE
    payload = {
        "header": asdict(header),
        "results": list(results),
        "baseline": baseline,
        "variants": summarise(results),
        "evidence": dict(evidence or {}),
    }
    raw.write_text(json.dumps(payload, indent=2, default=str))
    return [report, raw, *plots]
