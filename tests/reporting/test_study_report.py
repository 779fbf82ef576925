"""The study report's pieces: seeds pooled per variant, answers from evidence, plots whose
labels never overlap."""

from __future__ import annotations

import itertools

import pytest

from peftflow.reporting.plots import CostAxis, MetricAxis, scatter_metric, spread
from peftflow.reporting.study_report import (
    baseline_answer,
    compute_line,
    pair_answer,
    question_answers,
    reference_table,
    summarise,
)


def run(group, seed, f1, status="trained", **extra):
    return {
        "variant": f"{group}-seed{seed}",
        "group": group,
        "seed": seed,
        "questions": ["Q?"],
        "in_methods_table": False,
        "note": "",
        "settings": f"method.name=x, train.seed={seed}",
        "model": "minilm",
        "method": "x",
        "run_id": f"{group}{seed}".ljust(32, "0"),
        "status": status,
        "error": "",
        "test_accuracy": f1 + 0.02,
        "test_f1": f1,
        "trainable_percent": 1.0,
        "trainable_params": 100,
        "train_seconds": 10.0 * seed,
        "train_examples_per_second": 50.0,
        "peak_memory_mb": 1000.0 + seed,
        "predicted_peak_memory_mb": 990.0,
        "run_seconds": 20.0,
        **extra,
    }


ROWS = [run("a", 1, 0.90), run("a", 2, 0.92), run("a", 3, 0.94), run("b", 1, 0.80)]


def test_seeds_are_pooled_into_one_line_per_variant():
    a, b = summarise(ROWS)
    assert a["variant"] == "a" and a["seeds"] == [1, 2, 3]
    assert a["test_f1"] == pytest.approx(0.92) and a["test_f1_sd"] == pytest.approx(0.02)
    assert a["train_seconds"] == pytest.approx(20.0) and a["peak_memory_mb"] == 1003.0
    assert a["run_seconds"] == 60.0 and a["settings"] == "method.name=x"
    assert b["test_f1_sd"] is None and a["status"] == "3/3 seeds"


def test_a_failed_seed_is_left_out_of_the_mean_and_named():
    rows = [run("a", 1, 0.9), {**run("a", 2, 0.0), "status": "failed", "error": "OOM"}]
    (a,) = summarise(rows)
    assert a["test_f1"] == pytest.approx(0.9) and a["seeds"] == [1]
    assert a["status"] == "1/2 seeds, seed 2 failed: OOM"


def test_rows_without_seeds_stay_as_they_are():
    row = {**run("solo", 1, 0.9), "group": None, "seed": None, "variant": "solo"}
    assert summarise([row]) == [row]


PAIR = {
    "question": "Q?",
    "a": "a",
    "b": "b",
    "n": 890,
    "a_mean": 0.92,
    "b_mean": 0.80,
    "delta": 0.12,
    "low": 0.08,
    "high": 0.16,
    "level": 0.95,
    "verdict": "a",
    "seeds": {"a": 3, "b": 3},
    "trainable_ratio": 0.00648,
    "train_time_ratio": 0.5,
    "reference": {
        "a": {"label": "LoRA", "accuracy": 0.9667},
        "b": {"label": "all layers", "accuracy": 0.72},
        "delta_accuracy": 0.2467,
    },
    "agreement": "agrees",
}


def test_an_answer_states_the_interval_the_verdict_and_the_costs():
    text = pair_answer(PAIR)
    assert "test F1 92.00% vs 80.00% (mean of 3 and 3 seeds)" in text
    assert "ΔF1 +12.00 points, 95% CI [+8.00, +16.00]" in text and "`a` is better" in text
    assert "trainable parameters `a`/`b` = 0.00648x; train time `a`/`b` = 0.5x" in text
    tie = pair_answer({**PAIR, "low": -0.01, "verdict": "none"})
    assert "no difference at this budget" in tie and "is better" not in tie
    assert "`b` is better" in pair_answer({**PAIR, "high": -0.01, "verdict": "b"})
    assert "not compared (no finished run of b)" in pair_answer(
        {"a": "a", "b": "b", "missing": "no finished run of b"}
    )


def test_questions_answer_from_evidence_or_say_why_not():
    lines = question_answers(ROWS, {"questions": [PAIR]}, {"Q?": "why", "Larger?": "no pair"})
    assert lines[0] == "- **Q?**" and lines[1].startswith("  - `a` vs `b`: test F1")
    assert "  - _why_" in lines and "- **Larger?** not answered here: no pair" in lines
    # Without evidence a question falls back to its best and worst variant.
    assert "best `a`" in question_answers(ROWS)[0]


def test_the_reference_sits_beside_ours_with_the_direction():
    table = reference_table({"questions": [PAIR, {**PAIR, "reference": None}]})
    assert len(table) == 3  # header, rule, the one pair with a reference
    assert (
        "| LoRA: 96.67% | all layers: 72.00% | +24.67 | +12.00 [+8.00, +16.00] | agrees |"
        in (table[2])
    )


def test_the_baseline_answer_says_plainly_whether_it_is_reached():
    base = {**PAIR, "b": "tfidf-logreg"}
    assert "does **not** reach" in baseline_answer({"baseline": {**base, "verdict": "b"}})
    assert "reaches the baseline" in baseline_answer({"baseline": {**base, "verdict": "none"}})
    assert baseline_answer({}) is None


def test_compute_adds_every_run_and_the_baseline():
    assert compute_line(ROWS, {"train_seconds": 60.0}).startswith(
        "Compute: 2.3 min measured over 4"
    )


def test_spread_keeps_order_moves_little_and_parts_every_pair():
    heights = [0.5, 0.5, 0.51, 0.98, 0.99, 1.0, 0.1]
    placed = spread(heights, 0.05)
    assert all(0.0 <= h <= 1.0 for h in placed)
    assert all(abs(x - y) >= 0.05 - 1e-12 for x, y in itertools.combinations(placed, 2))
    assert placed[6] == 0.1  # a label with room stays at its point's height
    assert sorted(range(7), key=lambda i: (placed[i], i)) == sorted(
        range(7), key=lambda i: (heights[i], i)
    )


def test_plot_labels_never_overlap_even_for_coincident_points(tmp_path, monkeypatch):
    import matplotlib.figure

    captured = {}
    monkeypatch.setattr(
        matplotlib.figure.Figure,
        "savefig",
        lambda self, *a, **k: captured.setdefault("fig", self),
    )
    rows = [
        {"name": f"variant-with-a-long-name-{i}", "cost": 1.0 + (i % 3) * 1e-3, "f1": 0.9}
        for i in range(14)
    ] + [{"name": "sd", "cost": 50.0, "f1": 0.5, "sd": 0.05}]
    scatter_metric(
        rows,
        MetricAxis("f1", "F1", 100),
        CostAxis("cost", "cost"),
        tmp_path / "p.png",
        "name",
        error_key="sd",
    )
    fig = captured["fig"]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # places every annotation
    renderer = canvas.get_renderer()
    (ax,) = fig.axes
    # The labels' own text (an Annotation's extent would include its leader line).
    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]
    assert len(boxes) == len(rows)
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    assert all(box.x0 >= ax.get_window_extent(renderer).x1 for box in boxes)  # right of the axes
    assert all(box.x1 <= fig.bbox.x1 and box.y0 >= 0 and box.y1 <= fig.bbox.y1 for box in boxes)
