"""TF-IDF baseline on a small synthetic corpus whose label is a word rule."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest

from peftflow.errors import DataError
from peftflow.evaluation.tfidf_baseline import C_GRID, train_tfidf_baseline

LABELS = ["ham", "spam"]
FILLER = [
    "the",
    "a",
    "today",
    "please",
    "note",
    "about",
    "our",
    "team",
    "you",
    "we",
    "this",
    "week",
    "email",
]
SPAM_WORDS = ["prize", "winner", "free", "cash", "claim"]
HAM_WORDS = ["meeting", "lunch", "report", "agenda", "review"]


def synthetic_split(n: int, seed: int) -> pd.DataFrame:
    """Texts of filler words plus two words that give the label away."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % 2]
        cue = SPAM_WORDS if label == "spam" else HAM_WORDS
        words = rng.sample(FILLER, 6) + rng.sample(cue, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def splits() -> dict[str, pd.DataFrame]:
    return {
        "train": synthetic_split(80, 0),
        "val": synthetic_split(20, 1),
        "test": synthetic_split(20, 2),
    }


def test_baseline_learns_a_separable_rule(splits):
    result = train_tfidf_baseline(splits, LABELS, "spam", seed=0)
    assert result.metrics["test_accuracy"] == 1.0
    assert result.metrics["test_f1"] == 1.0
    assert result.metrics["val_f1"] == 1.0
    expected_keys = {
        f"{split}_{name}"
        for split in ("val", "test")
        for name in ("accuracy", "precision", "recall", "f1")
    }
    assert expected_keys | {"train_seconds"} == result.metrics.keys()
    assert result.metrics["train_seconds"] > 0
    assert result.test_confusion == [[10, 0], [0, 10]]  # rows: true ham, true spam
    assert result.best_c == C_GRID[0]  # every C is perfect on val; ties go to the smallest
    assert list(result.pipeline.predict(["claim your free cash", "agenda for the meeting"])) == [
        "spam",
        "ham",
    ]


def test_baseline_is_deterministic(splits):
    first = train_tfidf_baseline(splits, LABELS, "spam", seed=3)
    second = train_tfidf_baseline(splits, LABELS, "spam", seed=3)

    def without_time(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if k != "train_seconds"}

    assert without_time(first.metrics) == without_time(second.metrics)
    np.testing.assert_array_equal(
        first.pipeline.named_steps["classifier"].coef_,
        second.pipeline.named_steps["classifier"].coef_,
    )


def test_positive_label_sets_which_class_f1_reports(splits):
    noisy = dict(splits, test=splits["test"].assign(label=["spam"] * 20))
    as_spam = train_tfidf_baseline(noisy, LABELS, "spam", seed=0)
    as_ham = train_tfidf_baseline(noisy, LABELS, "ham", seed=0)
    assert as_spam.metrics["test_precision"] == 1.0 and as_spam.metrics["test_recall"] == 0.5
    assert as_ham.metrics["test_precision"] == 0.0 and as_ham.metrics["test_f1"] == 0.0
    assert as_spam.test_confusion == [[0, 0], [10, 10]]


def test_bad_inputs_name_the_problem(splits):
    with pytest.raises(DataError, match=r"missing \['test'\]"):
        train_tfidf_baseline({"train": splits["train"], "val": splits["val"]}, LABELS, "spam", 0)
    relabelled = dict(splits, val=splits["val"].assign(label="junk"))
    with pytest.raises(DataError, match=r"split 'val' has labels \['junk'\] not in"):
        train_tfidf_baseline(relabelled, LABELS, "spam", 0)
    renamed = dict(splits, train=splits["train"].rename(columns={"text": "body"}))
    with pytest.raises(DataError, match=r"split 'train' lacks columns \['text'\]"):
        train_tfidf_baseline(renamed, LABELS, "spam", 0)
    one_class = dict(splits, train=splits["train"][splits["train"]["label"] == "ham"])
    with pytest.raises(DataError, match="single label"):
        train_tfidf_baseline(one_class, LABELS, "spam", 0)
    with pytest.raises(DataError, match="positive_label 'phish'"):
        train_tfidf_baseline(splits, LABELS, "phish", 0)


def test_empty_vocabulary_is_a_data_error():
    unique_words = pd.DataFrame({"text": ["alpha", "beta", "gamma", "delta"], "label": LABELS * 2})
    tiny = {"train": unique_words, "val": unique_words, "test": unique_words}
    with pytest.raises(DataError, match="empty vocabulary"):
        train_tfidf_baseline(tiny, LABELS, "spam", 0)
