"""One scatter plot, shared by the study report and ``peftflow compare``: a metric against a cost.

Every point is labelled with its run (or variant) name; optional extras are a Pareto front
(highlighted and joined by a step line) and reference lines such as baselines (dashed,
horizontal). Rows are plain mappings, so callers plot from dicts without touching MLflow.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
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
    error_key: str | None = None,
) -> Path:
    """Plot ``metric`` against ``cost`` for every row that has both; write a PNG to ``path``.

    ``error_key``: a row's error bar (e.g. the sd over seeds, unscaled like the metric).
    Labels sit in a column right of the axes, one line apart, each joined to its point by a
    thin line: they never overlap, however close the points are.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get(cost.key) is not None and r.get(metric.key) is not None]
    height = max(5.0, LABEL_LINE_INCHES * len(points) + 1.5)
    fig, ax = plt.subplots(figsize=(10, height))
    fig.subplots_adjust(left=0.08, right=0.66, bottom=0.1, top=0.96)
    for row in points:
        _point(ax, row, metric, cost, error_key)
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
    _label_column(ax, points, metric, cost, label_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# Vertical room of one label in the column (8-point text plus leading).
LABEL_POINTS = 8
LABEL_LINE_INCHES = 1.5 * LABEL_POINTS / 72


def _point(ax: Any, row: Row, metric: MetricAxis, cost: CostAxis, error_key: str | None) -> None:
    x, y = row[cost.key], metric.scale * row[metric.key]
    error = row.get(error_key) if error_key else None
    if error is not None:
        ax.errorbar(x, y, yerr=metric.scale * error, color=POINT_COLOUR, capsize=3, linewidth=1)
    ax.scatter(x, y, color=POINT_COLOUR, zorder=3)


def _label_column(ax: Any, rows: Sequence[Row], metric: MetricAxis, cost: CostAxis, key: str):
    """Each row's label right of the axes at its point's height, nudged apart to one per line."""
    if not rows:
        return
    ax.set_xlim(ax.get_xlim())  # freeze the limits the labels are placed against
    ax.set_ylim(ax.get_ylim())
    to_axes = ax.transData + ax.transAxes.inverted()
    heights = [to_axes.transform((r[cost.key], metric.scale * r[metric.key]))[1] for r in rows]
    axes_inches = ax.get_position().height * ax.figure.get_figheight()
    spaced = spread(heights, LABEL_LINE_INCHES / axes_inches)
    for row, height in zip(rows, spaced, strict=True):
        ax.annotate(
            str(row[key]),
            (row[cost.key], metric.scale * row[metric.key]),
            xytext=(1.03, height),
            textcoords="axes fraction",
            fontsize=LABEL_POINTS,
            va="center",
            annotation_clip=False,
            arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.6},
        )


def spread(heights: Sequence[float], gap: float) -> list[float]:
    """Heights (axes fraction) moved as little as possible so any two are ``gap`` apart.

    Sorted bottom to top, each is pushed up to clear the one below; if the column then
    overflows the top it is pushed back down from the top. The input order is kept.
    """
    order = sorted(range(len(heights)), key=lambda i: heights[i])
    placed: list[float] = []
    for i in order:
        placed.append(max(heights[i], placed[-1] + gap) if placed else max(heights[i], 0.0))
    ceiling = 1.0
    for position in range(len(placed) - 1, -1, -1):
        placed[position] = min(placed[position], ceiling)
        ceiling = placed[position] - gap
    result = [0.0] * len(heights)
    for position, i in enumerate(order):
        result[i] = placed[position]
    return result


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
