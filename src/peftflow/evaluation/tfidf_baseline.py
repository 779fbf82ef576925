"""TF-IDF + logistic regression: the bar every fine-tuned model has to clear.

Spam filtering is largely a bag-of-words problem, so a fine-tuned language
model is only worth its cost if it beats this baseline on the same splits.
The regularisation strength C is chosen on the validation split; the test
split is scored once, with the chosen model.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from peftflow.errors import DataError
from peftflow.evaluation.classification_metrics import classification_metrics, confusion

REQUIRED_SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("text", "label")
C_GRID = (1.0, 10.0, 100.0)
MAX_FEATURES = 100_000


@dataclass(frozen=True)
class BaselineResult:
    """Val/test metrics, the test confusion matrix (rows = true label id) and the fitted pipeline.

    ``pipeline.predict`` returns label names (strings from ``labels``).
    """

    metrics: dict[str, float]
    test_confusion: list[list[int]]
    best_c: float
    pipeline: Pipeline


def _check_splits(splits: Mapping[str, pd.DataFrame], labels: Sequence[str]) -> None:
    missing = [name for name in REQUIRED_SPLITS if name not in splits]
    if missing:
        raise DataError(
            f"baseline needs splits {list(REQUIRED_SPLITS)}, missing {missing}; "
            "pass the output of the split step unchanged."
        )
    for name in REQUIRED_SPLITS:
        frame = splits[name]
        absent = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
        if absent:
            raise DataError(
                f"split {name!r} lacks columns {absent} (has {list(frame.columns)}); "
                "map the data to the standard text/label schema first."
            )
        unknown = sorted(set(frame["label"].astype(str)) - set(labels))
        if unknown:
            raise DataError(
                f"split {name!r} has labels {unknown} not in configured labels {list(labels)}; "
                "fix data.labels in the config or relabel the data."
            )
    if splits["train"]["label"].nunique() < 2:
        raise DataError("the train split has a single label; the baseline needs 2+ classes.")


def _make_pipeline(c: float, seed: int) -> Pipeline:
    return Pipeline(
        [
            (
                "tfidf",
                TfidfVectorizer(
                    sublinear_tf=True, ngram_range=(1, 2), min_df=2, max_features=MAX_FEATURES
                ),
            ),
            ("classifier", LogisticRegression(C=c, max_iter=2000, random_state=seed)),
        ]
    )


def _fit(train: pd.DataFrame, c: float, seed: int) -> Pipeline:
    try:
        return _make_pipeline(c, seed).fit(train["text"].astype(str), train["label"].astype(str))
    except ValueError as error:
        # sklearn's two wordings for "no term survived min_df".
        if not any(hint in str(error) for hint in ("empty vocabulary", "no terms remain")):
            raise
        raise DataError(
            "the train split has no word that appears in 2+ texts, so TF-IDF (min_df=2) "
            "has an empty vocabulary; use more (or less empty) training texts."
        ) from error


def _score(
    pipeline: Pipeline, frame: pd.DataFrame, labels: Sequence[str], positive: int, prefix: str
) -> tuple[dict[str, float], list[list[int]]]:
    """Metrics with ``prefix`` and the confusion matrix, on label ids (position in ``labels``)."""
    true_ids = [labels.index(label) for label in frame["label"].astype(str)]
    predicted_ids = [labels.index(label) for label in pipeline.predict(frame["text"].astype(str))]
    metrics = classification_metrics(true_ids, predicted_ids, positive=positive, prefix=prefix)
    return metrics, confusion(true_ids, predicted_ids, len(labels))


def train_tfidf_baseline(
    splits: Mapping[str, pd.DataFrame], labels: Sequence[str], positive_label: str, seed: int
) -> BaselineResult:
    """Fit one pipeline per C in :data:`C_GRID`, keep the best val F1, score it on test.

    Ties on val F1 go to the smaller C (the stronger regularisation).
    """
    labels = list(labels)
    if positive_label not in labels:
        raise DataError(f"positive_label {positive_label!r} is not one of labels {labels}.")
    _check_splits(splits, labels)
    positive = labels.index(positive_label)

    started = time.perf_counter()
    best: tuple[float, float, Pipeline, dict[str, float]] | None = None
    for c in C_GRID:
        pipeline = _fit(splits["train"], c, seed)
        val_metrics, _ = _score(pipeline, splits["val"], labels, positive, "val_")
        if best is None or val_metrics["val_f1"] > best[0]:
            best = (val_metrics["val_f1"], c, pipeline, val_metrics)
    train_seconds = time.perf_counter() - started

    _, best_c, pipeline, val_metrics = best
    test_metrics, test_confusion = _score(pipeline, splits["test"], labels, positive, "test_")
    metrics = {**val_metrics, **test_metrics, "train_seconds": train_seconds}
    return BaselineResult(metrics, test_confusion, best_c, pipeline)
