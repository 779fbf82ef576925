"""One scatter plot, shared by the study report and ``peftflow compare``: a metric against a cost.

Every point is labelled with its run (or variant) name; optional extras are a Pareto front
(highlighted and joined by a step line) and reference lines such as baselines (dashed,
horizontal). Rows are plain mappings, so callers plot from dicts without touching MLflow.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = Mapping[str, Any]
POINT_COLOUR = "tab:blue"
FRONT_COLOUR = "tab:orange"
# The first reference keeps the study report's red; more references get their own colours.
REFERENCE_COLOURS = ("tab:red", "tab:green", "tab:purple", "tab:brown", "tab:gray")


@dataclass(frozen=True)
class MetricAxis:
    """The y axis: which row key holds the metric, its label, and a display factor (100 for %)."""

    key: str
    label: str
    scale: float = 1.0


@dataclass(frozen=True)
class Reference:
    """A horizontal dashed line at ``value`` (unscaled, like the rows' metric)."""

    label: str
    value: float


@dataclass(frozen=True)
class CostAxis:
    """The x axis: which row key holds the cost, its label, and whether it is drawn log-scale."""

    key: str
    label: str
    log: bool = True


def scatter_metric(
    rows: Sequence[Row],
    metric: MetricAxis,
    cost: CostAxis,
    path: Path,
    label_key: str,
    front: Sequence[Row] = (),
    references: Sequence[Reference] = (),
) -> Path:
    """Plot ``metric`` against ``cost`` for every row that has both; write a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get(cost.key) is not None and r.get(metric.key) is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in points:
        _labelled_point(ax, row, metric, cost, label_key)
    _draw_front(ax, front, metric, cost)
    _draw_references(ax, references, metric)
    if front or references:
        ax.legend(loc="lower right", fontsize=8)
    # A log axis cannot place zero or negative costs; those plots stay linear.
    if cost.log and points and all(row[cost.key] > 0 for row in points):
        ax.set_xscale("log")
    ax.set_xlabel(cost.label)
    ax.set_ylabel(metric.label)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _labelled_point(ax: Any, row: Row, metric: MetricAxis, cost: CostAxis, label_key: str) -> None:
    x, y = row[cost.key], metric.scale * row[metric.key]
    ax.scatter(x, y, color=POINT_COLOUR)
    ax.annotate(str(row[label_key]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")


def _draw_front(ax: Any, front: Sequence[Row], metric: MetricAxis, cost: CostAxis) -> None:
    """Front points drawn over the plain ones, joined left to right by a step line.

    The step holds each front point's metric until the next, cheaper-to-dearer: the best
    metric reachable at each cost.
    """
    ordered = sorted(
        (row for row in front if row.get(cost.key) is not None), key=lambda r: r[cost.key]
    )
    if not ordered:
        return
    xs = [row[cost.key] for row in ordered]
    ys = [metric.scale * row[metric.key] for row in ordered]
    ax.step(xs, ys, where="post", color=FRONT_COLOUR, linewidth=1.2, zorder=2)
    ax.scatter(xs, ys, s=70, color=FRONT_COLOUR, edgecolors="black", zorder=3, label="Pareto front")


def _draw_references(ax: Any, references: Sequence[Reference], metric: MetricAxis) -> None:
    for index, reference in enumerate(references):
        ax.axhline(
            metric.scale * reference.value,
            color=REFERENCE_COLOURS[index % len(REFERENCE_COLOURS)],
            linestyle="--",
            label=reference.label,
        )
