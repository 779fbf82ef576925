"""How sure an improvement is: a paired bootstrap interval of a metric's difference.

Two models' outputs on the same test examples are resampled together (the same example
indices for both), the metric difference is computed on each resample, and its percentile
interval is reported (Koehn 2004; Berg-Kirkpatrick et al. 2012). scipy's ``bootstrap`` draws
the resamples; the percentile method is used because BCa needs one extra evaluation of a
corpus metric per example (its jackknife).

Depends on: evaluation (classification_metrics, text_metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap

from peftflow.evaluation.classification_metrics import classification_metrics
from peftflow.evaluation.text_metrics import corpus_metric, per_example_metric

# metric(references, predictions) -> value, over one (re)sample of examples
Metric = Callable[[Sequence[str], Sequence[str]], float]

CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1")


@dataclass(frozen=True)
class PairedInterval:
    """The candidate's and champion's metric on the same ``n`` examples, and the interval of
    their difference (candidate - champion) at ``level``."""

    metric: str
    n: int
    candidate: float
    champion: float
    low: float
    high: float
    level: float
    resamples: int

    @property
    def improvement(self) -> float:
        return self.candidate - self.champion

    def describe(self) -> str:
        return (
            f"improvement {self.improvement:+.4f}, {self.level:.0%} interval "
            f"[{self.low:+.4f}, {self.high:+.4f}] (paired bootstrap over {self.n} test "
            f"examples, {self.resamples} resamples)"
        )


def paired_bootstrap(
    metric_name: str,
    metric: Metric,
    references: Sequence[str],
    candidate: Sequence[str],
    champion: Sequence[str],
    level: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> PairedInterval:
    """The interval of ``metric(candidate) - metric(champion)``, resampling examples jointly."""
    refs, cand, champ = (
        np.asarray(list(x), dtype=object) for x in (references, candidate, champion)
    )
    if not len(refs) == len(cand) == len(champ) >= 2:
        raise ValueError(
            f"a paired bootstrap needs at least 2 examples scored by both models; got "
            f"{len(refs)} references, {len(cand)} and {len(champ)} predictions"
        )

    def difference(index: np.ndarray) -> float:
        rows = index.astype(int)
        return metric(refs[rows], cand[rows]) - metric(refs[rows], champ[rows])

    result = bootstrap(
        (np.arange(len(refs)),),
        difference,
        n_resamples=resamples,
        vectorized=False,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return PairedInterval(
        metric_name,
        len(refs),
        metric(refs, cand),
        metric(refs, champ),
        float(low),
        float(high),
        level,
        resamples,
    )


def metric_for(
    task: str, name: str, labels: Sequence[str] = (), positive_label: str | None = None
) -> Metric:
    """The function that computes logged metric ``name`` (``test_f1``, ``test_bleu``, ...) of a
    task from references and predictions, exactly as training logged it."""
    key = name.removeprefix("test_")
    if task == "classification" and key in CLASSIFICATION_METRICS:
        index = {label: i for i, label in enumerate(labels)}
        positive = index.get(positive_label, 1)

        def classification(references: Sequence[str], predictions: Sequence[str]) -> float:
            y_true = [index.get(r, -1) for r in references]
            y_pred = [index.get(p, -1) for p in predictions]
            return classification_metrics(y_true, y_pred, positive)[key]

        return classification
    if task == "generation":
        found = corpus_metric(key) or per_example_metric(key)
        if found:
            return found
    raise ValueError(
        f"the gate cannot recompute {name!r} per example for task {task!r}; use test_"
        f"{', test_'.join(CLASSIFICATION_METRICS if task == 'classification' else GENERATION)}"
    )


GENERATION = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match")


# --- several seeds per side ------------------------------------------------------------------


def seed_averaged_interval(
    metric_name: str,
    references: Sequence[str],
    candidate_runs: Sequence[Sequence[str]],
    champion_runs: Sequence[Sequence[str]],
    labels: Sequence[str],
    positive_label: str | None = None,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> PairedInterval:
    """The interval of (mean over the candidate's runs) - (mean over the champion's runs) of a
    classification metric, resampling the test examples jointly for every run.

    Each side is a variant trained with several seeds on one split: the seed mean is what a
    study compares, and resampling examples gives its uncertainty over the test set (the
    seeds' own spread is reported beside it as their sd). Vectorised: every resample of
    every run is scored at once from its confusion counts, as ``classification_metrics``
    scores one (binary: the positive class; otherwise macro over ``labels``).
    """
    key = metric_name.removeprefix("test_")
    if key not in CLASSIFICATION_METRICS:
        raise ValueError(
            f"{metric_name!r} is not one of test_{', test_'.join(CLASSIFICATION_METRICS)}"
        )
    index = {label: i for i, label in enumerate(labels)}
    truth = np.array([index.get(r, -1) for r in references])
    sides = [
        np.array([[index.get(p, -1) for p in run] for run in runs])
        for runs in (candidate_runs, champion_runs)
    ]
    if (
        any(side.ndim != 2 or side.shape[0] == 0 or side.shape[1] != len(truth) for side in sides)
        or len(truth) < 2
    ):
        raise ValueError(
            f"each side needs one or more runs with one prediction per reference ({len(truth)}, "
            "at least 2); got runs of shapes "
            f"{[list(side.shape) for side in sides]}"
        )
    positive = index.get(positive_label, 1)
    classes = [positive] if len(labels) <= 2 else list(range(len(labels)))
    rows = np.random.default_rng(seed).integers(0, len(truth), size=(resamples, len(truth)))
    # [R, n] resampled truth; each side's [S, R, n] resampled predictions -> [R] seed means.
    on_resamples = [_metric_of(key, truth[rows], side[:, rows], classes).mean(0) for side in sides]
    differences = on_resamples[0] - on_resamples[1]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(differences, [tail, 100 - tail])
    full = [_metric_of(key, truth[None], side[:, None], classes).mean() for side in sides]
    return PairedInterval(
        metric_name,
        len(truth),
        float(full[0]),
        float(full[1]),
        float(low),
        float(high),
        level,
        resamples,
    )


def _metric_of(
    key: str, truth: np.ndarray, predictions: np.ndarray, classes: list[int]
) -> np.ndarray:
    """``key`` of every run on every resample: truth [R, n], predictions [S, R, n] -> [S, R]."""
    if key == "accuracy":
        return (predictions == truth).mean(-1)
    per_class = []
    for c in classes:
        predicted, actual = predictions == c, truth == c
        tp = (predicted & actual).sum(-1)
        fp = (predicted & ~actual).sum(-1)
        fn = (~predicted & actual).sum(-1)
        precision = np.divide(tp, tp + fp, out=np.zeros(tp.shape), where=(tp + fp) > 0)
        recall = np.divide(tp, tp + fn, out=np.zeros(tp.shape), where=(tp + fn) > 0)
        f1 = np.divide(
            2 * tp, 2 * tp + fp + fn, out=np.zeros(tp.shape), where=(2 * tp + fp + fn) > 0
        )
        per_class.append({"precision": precision, "recall": recall, "f1": f1}[key])
    return np.mean(per_class, axis=0)
