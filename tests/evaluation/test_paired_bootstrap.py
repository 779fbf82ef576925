"""The paired bootstrap interval the promotion gate judges, and metrics recomputed per example."""

from __future__ import annotations

import random

import pytest

from peftflow.evaluation.classification_metrics import classification_metrics
from peftflow.evaluation.paired_bootstrap import metric_for, paired_bootstrap
from peftflow.evaluation.text_metrics import generation_metrics

LABELS = ["ham", "spam"]


def answers(n: int, accuracy: float, seed: int) -> tuple[list[str], list[str]]:
    """References and predictions right on about ``accuracy`` of ``n`` examples."""
    rng = random.Random(seed)
    refs = [rng.choice(LABELS) for _ in range(n)]
    preds = [r if rng.random() < accuracy else LABELS[1 - LABELS.index(r)] for r in refs]
    return refs, preds


def interval(refs, cand, champ, **kw):
    f1 = metric_for("classification", "test_f1", LABELS, "spam")
    return paired_bootstrap("test_f1", f1, refs, cand, champ, **kw)


def test_a_clearly_better_candidate_has_an_interval_above_zero():
    refs, cand = answers(400, 0.95, seed=1)
    _, champ = answers(400, 0.65, seed=1)
    found = interval(refs, cand, champ)
    assert found.n == 400 and found.low > 0.15 and found.low <= found.improvement <= found.high


def test_a_small_lead_on_few_examples_is_not_distinguishable_from_luck():
    refs, cand = answers(8, 1.0, seed=2)
    champ = list(cand)
    champ[0] = LABELS[1 - LABELS.index(champ[0])]  # the champion misses one of eight
    found = interval(refs, cand, champ)
    assert found.improvement > 0 and found.low <= 0 < found.high


def test_identical_models_differ_by_exactly_nothing():
    refs, preds = answers(50, 0.8, seed=3)
    found = interval(refs, preds, preds)
    assert (found.low, found.improvement, found.high) == (0.0, 0.0, 0.0)


def test_the_interval_is_reproducible_and_widens_with_the_level():
    refs, cand = answers(120, 0.85, seed=4)
    _, champ = answers(120, 0.8, seed=5)
    assert interval(refs, cand, champ) == interval(refs, cand, champ)
    narrow, wide = interval(refs, cand, champ, level=0.8), interval(refs, cand, champ, level=0.99)
    assert wide.low < narrow.low and narrow.high < wide.high


def test_fewer_than_two_examples_are_refused():
    with pytest.raises(ValueError, match="at least 2 examples"):
        interval(["spam"], ["spam"], ["ham"])


@pytest.mark.parametrize("metric", ["accuracy", "precision", "recall", "f1"])
def test_classification_metrics_recomputed_from_names_equal_the_logged_ones(metric):
    refs, preds = answers(60, 0.7, seed=6)
    ids = [[LABELS.index(x) for x in xs] for xs in (refs, preds)]
    logged = classification_metrics(*ids, positive=1, prefix="test_")[f"test_{metric}"]
    assert metric_for("classification", f"test_{metric}", LABELS, "spam")(refs, preds) == logged


@pytest.mark.parametrize("metric", ["bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match"])
def test_generation_metrics_recomputed_per_resample_equal_the_logged_ones(metric):
    refs = ["meeting at noon", "free prize inside", "project report due", "lunch on friday"]
    preds = ["meeting at noon", "a free prize", "report due today", "friday lunch"]
    logged = generation_metrics(preds, refs, prefix="test_")[f"test_{metric}"]
    assert metric_for("generation", f"test_{metric}")(refs, preds) == pytest.approx(logged)


def test_a_metric_the_gate_cannot_recompute_is_named_with_the_choices():
    with pytest.raises(ValueError, match="test_bleu, test_chrf"):
        metric_for("generation", "test_loss")
