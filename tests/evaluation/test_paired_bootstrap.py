"""The paired bootstrap interval the promotion gate judges, and metrics recomputed per example."""

from __future__ import annotations

import random

import pytest

from peftflow.evaluation.classification_metrics import classification_metrics
from peftflow.evaluation.paired_bootstrap import (
    metric_for,
    paired_bootstrap,
    seed_averaged_interval,
)
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


# --- several seeds per side ------------------------------------------------------------------


def seeded(refs, accuracy, seeds):
    """One prediction list per seed, each right on about ``accuracy`` of ``refs``."""
    runs = []
    for seed in seeds:
        rng = random.Random(seed)
        runs.append([r if rng.random() < accuracy else LABELS[1 - LABELS.index(r)] for r in refs])
    return runs


def test_one_seed_a_side_matches_the_scipy_bootstrap():
    refs, cand = answers(300, 0.9, seed=4)
    _, champ = answers(300, 0.8, seed=5)
    scipy = interval(refs, cand, champ, resamples=4000)
    ours = seed_averaged_interval("test_f1", refs, [cand], [champ], LABELS, "spam", resamples=4000)
    assert ours.candidate == pytest.approx(scipy.candidate)
    assert ours.champion == pytest.approx(scipy.champion)
    # Two independent bootstraps of one statistic: the same interval up to resampling noise.
    assert ours.low == pytest.approx(scipy.low, abs=0.01)
    assert ours.high == pytest.approx(scipy.high, abs=0.01)


def test_each_side_is_the_mean_over_its_seeds():
    refs, _ = answers(200, 1.0, seed=6)
    cand, champ = seeded(refs, 0.9, [1, 2, 3]), seeded(refs, 0.7, [4, 5])
    ids = {label: i for i, label in enumerate(LABELS)}

    def mean(runs, key):
        truth = [ids[r] for r in refs]
        return sum(classification_metrics(truth, [ids[p] for p in run])[key] for run in runs) / len(
            runs
        )

    for metric in ("test_f1", "test_accuracy", "test_precision", "test_recall"):
        found = seed_averaged_interval(metric, refs, cand, champ, LABELS, "spam")
        key = metric.removeprefix("test_")
        assert found.candidate == pytest.approx(mean(cand, key))
        assert found.champion == pytest.approx(mean(champ, key))
        assert found.low <= found.improvement <= found.high


def test_more_seeds_of_the_same_models_narrow_nothing_but_noise():
    refs, _ = answers(400, 1.0, seed=7)
    same = seeded(refs, 0.85, [1, 2, 3])
    found = seed_averaged_interval("test_f1", refs, same, same, LABELS, "spam")
    assert (found.low, found.improvement, found.high) == (0.0, 0.0, 0.0)
    better = seed_averaged_interval("test_f1", refs, seeded(refs, 0.97, [1, 2, 3]), same, LABELS)
    assert better.low > 0


def test_macro_f1_for_more_than_two_labels():
    labels = ["a", "b", "c"]
    refs = ["a", "b", "c"] * 20
    perfect, shifted = list(refs), [labels[(labels.index(r) + 1) % 3] for r in refs]
    found = seed_averaged_interval("test_f1", refs, [perfect], [shifted], labels)
    assert (found.candidate, found.champion) == (1.0, 0.0) and found.low == 1.0


@pytest.mark.parametrize(
    ("metric", "cand", "message"),
    [
        ("test_bleu", [["ham"] * 3], "not one of"),
        ("test_f1", [], "one or more runs"),
        ("test_f1", [["ham"] * 2], "one prediction per reference"),
    ],
)
def test_bad_input_is_refused_with_what_to_fix(metric, cand, message):
    with pytest.raises(ValueError, match=message):
        seed_averaged_interval(metric, ["ham", "spam", "ham"], cand, [["ham"] * 3], LABELS)
