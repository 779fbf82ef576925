"""A study's evidence: each question's pair compared on the same test emails over its seeds."""

from __future__ import annotations

import random

import pytest

from peftflow.evaluation.test_outputs import ExampleOutputs
from peftflow.pipeline.study import StudyConfig
from peftflow.pipeline.study_evidence import (
    compare_pair,
    compare_with_baseline,
    question_evidence,
)

LABELS = ["ham", "spam"]
N = 300
TRUTH = [random.Random(0).choice(LABELS) for _ in range(N)]


def outputs(accuracy: float, seed: int, ids: list[str] | None = None) -> ExampleOutputs:
    rng = random.Random(seed)
    predictions = [t if rng.random() < accuracy else LABELS[1 - LABELS.index(t)] for t in TRUTH]
    ids = ids or [str(i) for i in range(N)]
    return ExampleOutputs("classification", ids, ["x"] * N, TRUTH, predictions, LABELS, "spam")


def row(group, seed, f1, **extra):
    return {
        "variant": f"{group}-seed{seed}",
        "group": group,
        "seed": seed,
        "run_id": f"{group}-{seed}",
        "status": "trained",
        "test_f1": f1,
        "trainable_params": {"good": 10, "poor": 1000}.get(group, 1),
        "train_seconds": {"good": 30.0, "poor": 60.0}.get(group, 1.0),
        "reference": {
            "good": {"label": "g", "accuracy": 0.9},
            "poor": {"label": "p", "accuracy": 0.7},
        }.get(group),
        **extra,
    }


RUNS = {
    **{f"good-{s}": outputs(0.97, s) for s in (1, 2, 3)},
    **{f"poor-{s}": outputs(0.75, 10 + s) for s in (1, 2, 3)},
    **{f"twin-{s}": outputs(0.97, s) for s in (1, 2, 3)},
    "baseline": outputs(0.9, 99),
}
ROWS = [row(g, s, 0.5) for g in ("good", "poor", "twin") for s in (1, 2, 3)]


def test_a_clear_gap_is_a_finding_with_its_costs_and_reference():
    pair = compare_pair("Q?", "good", "poor", ROWS, RUNS.get)
    assert pair["verdict"] == "a" and pair["low"] > 0 and pair["n"] == N
    assert pair["seeds"] == {"good": 3, "poor": 3} and pair["sd"]["good"] >= 0
    assert pair["trainable_ratio"] == pytest.approx(0.01)
    assert pair["train_time_ratio"] == pytest.approx(0.5)
    assert pair["reference"]["delta_accuracy"] == pytest.approx(0.2)
    assert pair["agreement"] == "agrees"
    flipped = compare_pair("Q?", "poor", "good", ROWS, RUNS.get)
    assert flipped["verdict"] == "b" and flipped["agreement"] == "agrees"


def test_the_same_predictions_are_no_difference_and_the_answer_says_so():
    pair = compare_pair("Q?", "twin", "good", ROWS, RUNS.get)
    assert pair["verdict"] == "none" and pair["low"] <= 0 <= pair["high"]
    assert pair["reference"] is None and pair["agreement"] is None  # twin has no reference


def test_a_reference_in_the_other_direction_disagrees():
    references = {"poor": {"label": "better", "accuracy": 0.99}}
    pair = compare_pair("Q?", "good", "poor", ROWS, RUNS.get, references=references)
    assert pair["reference"]["b"]["label"] == "better"
    assert pair["agreement"] == "disagrees"


def test_missing_runs_outputs_or_split_are_named_not_scored():
    failed = [r if r["group"] != "poor" else {**r, "status": "failed"} for r in ROWS]
    assert compare_pair("Q?", "good", "poor", failed, RUNS.get)["missing"] == (
        "no finished run of poor"
    )
    no_file = {**RUNS, "poor-2": None}
    assert (
        "logged no test outputs" in compare_pair("Q?", "good", "poor", ROWS, no_file.get)["missing"]
    )
    other = {**RUNS, "poor-1": outputs(0.75, 11, ids=[f"other-{i}" for i in range(N)])}
    assert (
        "different test examples" in compare_pair("Q?", "good", "poor", ROWS, other.get)["missing"]
    )


def test_every_question_pair_in_study_order():
    study = StudyConfig.model_validate(
        {
            "name": "s",
            "base": "b.yaml",
            "variants": [{"name": n, "question": "Q?"} for n in ("good", "poor", "twin")],
            "questions": [
                {"question": "Q?", "compare": [["good", "poor"], ["twin", "good"]]},
                {"question": "Unanswerable?", "note": "no pair"},
            ],
        }
    )
    found = question_evidence(study, ROWS, RUNS.get, resamples=200)
    assert [(p["a"], p["b"], p["verdict"]) for p in found] == [
        ("good", "poor", "a"),
        ("twin", "good", "none"),
    ]


def test_a_question_may_only_compare_the_studys_variants():
    with pytest.raises(ValueError, match=r"compares \['nope'\], which are not variants"):
        StudyConfig.model_validate(
            {
                "name": "s",
                "base": "b.yaml",
                "variants": [{"name": "good", "question": "Q?"}],
                "questions": [{"question": "Q?", "compare": [["good", "nope"]]}],
            }
        )


def test_the_best_variant_is_compared_with_the_baseline():
    rows = [{**r, "test_f1": {"good": 0.95, "poor": 0.7, "twin": 0.94}[r["group"]]} for r in ROWS]
    baseline = {"variant": "tfidf-logreg", "run_id": "baseline"}
    found = compare_with_baseline(rows, baseline, RUNS.get)
    assert (found["a"], found["b"], found["verdict"]) == ("good", "tfidf-logreg", "a")
    assert (
        "logged no test outputs"
        in compare_with_baseline(rows, {"run_id": "gone"}, RUNS.get)["missing"]
    )
