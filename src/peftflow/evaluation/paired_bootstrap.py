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
