"""Generation metrics: sacreBLEU (BLEU, chrF), ROUGE-1/2/L, exact match and a sample table.

ROUGE follows Google's ``rouge-score`` defaults without stemming (its tokenizer and
sentence-level F1), implemented here because that package is not a dependency.
BLEU and chrF are sacreBLEU's corpus scores with its default settings, so the
numbers are comparable with anything that logs the same ``bleu_signature()``.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Sequence

import pandas as pd
from sacrebleu import sentence_bleu
from sacrebleu.metrics import BLEU, CHRF

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_TRAILING_PUNCTUATION = ".!?"
_ELLIPSIS = "\u2026"


def tokens_for_rouge(text: str) -> list[str]:
    """Lowercase, every run of non-[a-z0-9] characters becomes a space, split."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f1(overlap: int, n_predicted: int, n_reference: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_predicted, overlap / n_reference
    return 2 * precision * recall / (precision + recall)


def rouge_n(prediction: str, reference: str, n: int) -> float:
    """ROUGE-N F1 from clipped n-gram overlap; 0.0 when either side has no n-grams."""
    if n < 1:
        raise ValueError(f"ROUGE-N needs n >= 1, got n={n}")
    predicted = _ngrams(tokens_for_rouge(prediction), n)
    expected = _ngrams(tokens_for_rouge(reference), n)
    # Counter & Counter keeps the minimum count: a repeated word only matches as
    # often as it occurs in the other text (clipping).
    overlap = sum((predicted & expected).values())
    return _f1(overlap, sum(predicted.values()), sum(expected.values()))


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence length, one row of the DP table at a time."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[-1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 from the longest common subsequence of the two token lists."""
    predicted, expected = tokens_for_rouge(prediction), tokens_for_rouge(reference)
    return _f1(_lcs_length(predicted, expected), len(predicted), len(expected))


def _normalise(text: str) -> str:
    collapsed = " ".join(text.lower().split())
    return collapsed.rstrip(_TRAILING_PUNCTUATION).rstrip()


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after lowercasing, collapsing whitespace and dropping trailing . ! ?"""
    return _normalise(prediction) == _normalise(reference)


def _bleu() -> BLEU:
    # sacreBLEU defaults (13a tokenizer, mixed case, exp smoothing): keep them in
    # one place so the scores and the logged signature can never disagree.
    return BLEU()


def bleu_signature() -> str:
    """sacreBLEU's signature of the BLEU settings ``generation_metrics`` uses (one reference)."""
    metric = _bleu()
    # sacreBLEU only knows the number of reference streams after scoring once.
    metric.corpus_score(["x"], [["x"]])
    return metric.get_signature().format()


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: "
            "pass one prediction per reference, in the same order"
        )
    if not predictions:
        raise ValueError("no predictions and references: there is nothing to score")


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def generation_metrics(
    predictions: Sequence[str], references: Sequence[str], prefix: str = ""
) -> dict[str, float]:
    """Corpus BLEU/chrF (0-100), mean ROUGE F1 x 100, exact match % and length statistics."""
    predictions, references = list(predictions), list(references)
    _check_pairs(predictions, references)
    pairs = list(zip(predictions, references, strict=True))
    values = {
        "bleu": _bleu().corpus_score(predictions, [references]).score,
        "chrf": CHRF().corpus_score(predictions, [references]).score,
        **{
            key: 100 * _mean([score(p, r) for p, r in pairs])
            for key, score in PER_EXAMPLE_SCORES.items()
        },
        "pred_words": _mean([len(p.split()) for p in predictions]),
        "ref_words": _mean([len(r.split()) for r in references]),
        "empty_predictions": 100 * _mean([not p.strip() for p in predictions]),
        "n_examples": len(pairs),
    }
    return {f"{prefix}{key}": float(value) for key, value in values.items()}


# The per-example scores whose mean (x 100) ``generation_metrics`` logs.
PER_EXAMPLE_SCORES: dict[str, Callable[[str, str], float]] = {
    "rouge1": lambda prediction, reference: rouge_n(prediction, reference, 1),
    "rouge2": lambda prediction, reference: rouge_n(prediction, reference, 2),
    "rougeL": rouge_l,
    "exact_match": lambda prediction, reference: float(exact_match(prediction, reference)),
}


def corpus_metric(key: str) -> Callable[[Sequence[str], Sequence[str]], float] | None:
    """``(references, predictions) -> value`` of corpus metric ``key`` (bleu, chrf) as
    ``generation_metrics`` computes it; None for another key."""
    scorers = {"bleu": _bleu, "chrf": CHRF}
    if key not in scorers:
        return None
    scorer = scorers[key]()
    return lambda refs, preds: scorer.corpus_score(list(preds), [list(refs)]).score


def per_example_metric(key: str) -> Callable[[Sequence[str], Sequence[str]], float] | None:
    """``(references, predictions) -> value`` of a mean-of-examples metric (rouge*,
    exact_match), each pair scored once however often a resample repeats it; None for
    another key."""
    score = PER_EXAMPLE_SCORES.get(key)
    if score is None:
        return None
    cached = functools.lru_cache(maxsize=None)(score)
    return lambda refs, preds: 100 * _mean([cached(p, r) for p, r in zip(preds, refs, strict=True)])


def _shorten(text: str, max_chars: int) -> str:
    """At most ``max_chars`` characters; a cut text ends with an ellipsis."""
    if len(text) <= max_chars:
        return text
    return text[: max_chars - 1].rstrip() + _ELLIPSIS


def samples_table(
    texts: Sequence[str],
    references: Sequence[str],
    predictions: Sequence[str],
    baseline_predictions: Sequence[str] | None = None,
    n: int = 50,
    max_chars: int = 500,
) -> pd.DataFrame:
    """The first ``n`` examples side by side, with sentence BLEU and exact match per row."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    columns = {"input": texts, "reference": references, "prediction": predictions}
    if baseline_predictions is not None:
        columns["zero_shot"] = baseline_predictions
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"samples_table needs equally long inputs, got lengths {lengths}")
    rows = {name: list(values)[: max(n, 0)] for name, values in columns.items()}
    rows["input"] = [_shorten(text, max_chars) for text in rows["input"]]
    pairs = list(zip(rows["prediction"], rows["reference"], strict=True))
    # Sentence BLEU uses effective order (skips n-gram orders longer than the
    # sentence), so a short exact prediction scores 100 rather than ~0.
    rows["bleu"] = [sentence_bleu(p, [r]).score for p, r in pairs]
    rows["exact_match"] = [exact_match(p, r) for p, r in pairs]
    return pd.DataFrame(rows)
