"""A study's evidence: each question's pairs compared on the test emails, over every seed.

A question names pairs of variants (``compare: [[a, b]]``). For each pair, the seed-mean
test F1 of ``a`` minus that of ``b`` gets a paired bootstrap interval over the test
examples (both variants scored the same emails); the answer says which one is better
only when the interval excludes 0, else "no difference at this budget". Each pair also
carries the ratios of trainable parameters and of train time, and the reference's
result for the same two variants when the study has one, with whether the directions
agree. The best variant is compared with the TF-IDF baseline the same way.

Depends on: evaluation (paired_bootstrap, test_outputs), pipeline (study, gate).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from peftflow.evaluation.paired_bootstrap import seed_averaged_interval
from peftflow.evaluation.test_outputs import ExampleOutputs
from peftflow.pipeline.gate import logged_outputs
from peftflow.pipeline.study import NOT_TRAINED, StudyConfig

METRIC = "test_f1"
NO_DIFFERENCE = "no difference at this budget"
# run id -> its logged test outputs (None when the run logged none)
OutputsOf = Callable[[str], ExampleOutputs | None]
Row = Mapping[str, Any]


def trained_runs(rows: Sequence[Row], group: str) -> list[Row]:
    """The finished runs (every seed) of the variant the study YAML calls ``group``."""
    return [r for r in rows if r.get("group") == group and r.get("status") not in NOT_TRAINED]


def question_evidence(
    study: StudyConfig, rows: Sequence[Row], outputs_of: OutputsOf, resamples: int = 2000
) -> list[dict]:
    """One comparison per pair of every question, in the study's order."""
    comparisons = []
    for spec in study.questions:
        references = {name: ref.model_dump() for name, ref in spec.references.items()}
        for a, b in spec.compare:
            pair = compare_pair(spec.question, a, b, rows, outputs_of, resamples, references)
            comparisons.append(pair)
    return comparisons


def compare_pair(
    question: str,
    a: str,
    b: str,
    rows: Sequence[Row],
    outputs_of: OutputsOf,
    resamples: int = 2000,
    references: Mapping[str, Row] | None = None,
) -> dict:
    """``a`` against ``b``: the interval of their seed-mean F1 difference, ratios, reference
    (a variant's entry in ``references`` in place of its own)."""
    found = {name: trained_runs(rows, name) for name in (a, b)}
    result: dict[str, Any] = {"question": question, "a": a, "b": b, "metric": METRIC}
    missing = [name for name, runs in found.items() if not runs]
    if missing:
        return {**result, "missing": f"no finished run of {', '.join(missing)}"}
    outputs = {name: _outputs(runs, outputs_of) for name, runs in found.items()}
    problem = _incomparable(outputs)
    if problem:
        return {**result, "missing": problem}
    interval = _interval(outputs[a], outputs[b], resamples)
    return {
        **result,
        **interval,
        "seeds": {a: len(found[a]), b: len(found[b])},
        "sd": {name: _sd([r[METRIC] for r in runs]) for name, runs in found.items()},
        "trainable_ratio": _ratio(found[a], found[b], "trainable_params"),
        "train_time_ratio": _ratio(found[a], found[b], "train_seconds"),
        **_against_reference(*(_reference(found, n, references) for n in (a, b)), interval),
    }


def _reference(found: Mapping[str, list[Row]], name: str, overrides: Mapping | None) -> Row | None:
    return (overrides or {}).get(name) or found[name][0].get("reference")


def compare_with_baseline(
    rows: Sequence[Row], baseline: Row, outputs_of: OutputsOf, resamples: int = 2000
) -> dict:
    """The best variant (highest seed-mean F1) against the TF-IDF baseline's test outputs."""
    groups = {
        r["group"] for r in rows if r.get("status") not in NOT_TRAINED and r.get(METRIC) is not None
    }
    if not groups:
        return {"missing": "no finished variant"}
    best = max(groups, key=lambda g: statistics.fmean(r[METRIC] for r in trained_runs(rows, g)))
    result = {"a": best, "b": baseline.get("variant", "baseline"), "metric": METRIC}
    ours = _outputs(trained_runs(rows, best), outputs_of)
    theirs = outputs_of(baseline["run_id"]) if baseline.get("run_id") else None
    if theirs is None or None in ours:
        return {**result, "missing": "the baseline or the best variant logged no test outputs"}
    problem = _incomparable({best: ours, "baseline": [theirs]})
    if problem:
        return {**result, "missing": problem}
    return {**result, **_interval(ours, [theirs], resamples)}


def _outputs(runs: Sequence[Row], outputs_of: OutputsOf) -> list[ExampleOutputs | None]:
    return [outputs_of(run["run_id"]) for run in runs]


def _incomparable(outputs: Mapping[str, list[ExampleOutputs | None]]) -> str | None:
    """Why these runs cannot be compared example by example, or None."""
    absent = sorted(name for name, runs in outputs.items() if any(o is None for o in runs))
    if absent:
        return f"runs of {', '.join(absent)} logged no test outputs"
    every = [o for runs in outputs.values() for o in runs]
    if not all(o.same_examples(every[0]) for o in every[1:]):
        return "the runs scored different test examples (a different split)"
    return None


def _interval(a: list[ExampleOutputs], b: list[ExampleOutputs], resamples: int) -> dict:
    first = a[0]
    interval = seed_averaged_interval(
        METRIC,
        first.references,
        [o.predictions for o in a],
        [o.predictions for o in b],
        first.labels,
        first.positive_label,
        resamples=resamples,
    )
    verdict = "a" if interval.low > 0 else "b" if interval.high < 0 else "none"
    return {
        "n": interval.n,
        "a_mean": interval.candidate,
        "b_mean": interval.champion,
        "delta": interval.improvement,
        "low": interval.low,
        "high": interval.high,
        "level": interval.level,
        "resamples": interval.resamples,
        "verdict": verdict,
    }


def _sd(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) if len(values) >= 2 else None


def _ratio(a: Sequence[Row], b: Sequence[Row], key: str) -> float | None:
    """Mean of ``key`` over a's runs divided by b's (None when either is missing or 0)."""
    values = [[r[key] for r in runs if r.get(key) is not None] for runs in (a, b)]
    if not all(values) or statistics.fmean(values[1]) == 0:
        return None
    return statistics.fmean(values[0]) / statistics.fmean(values[1])


def _against_reference(ref_a: Row | None, ref_b: Row | None, interval: Mapping) -> dict:
    """The reference's two results and whether its direction matches ours.

    Ours has a direction only when its interval excludes 0; the reference reports single
    runs, so any difference of its accuracies counts as its direction.
    """
    if not ref_a or not ref_b:
        return {"reference": None, "agreement": None}
    reference_delta = ref_a["accuracy"] - ref_b["accuracy"]
    if interval["verdict"] == "none":
        agreement = "ours: no difference"
    elif reference_delta == 0:
        agreement = "reference: no difference"
    else:
        ours_up = interval["verdict"] == "a"
        agreement = "agrees" if ours_up == (reference_delta > 0) else "disagrees"
    reference = {"a": dict(ref_a), "b": dict(ref_b), "delta_accuracy": reference_delta}
    return {"reference": reference, "agreement": agreement}


# --- reading runs back from MLflow ----------------------------------------------------------


def mlflow_outputs(client) -> OutputsOf:
    """``outputs_of`` over an MLflow client: each run's logged test outputs, read once."""
    cache: dict[str, ExampleOutputs | None] = {}

    def outputs_of(run_id: str) -> ExampleOutputs | None:
        if run_id not in cache:
            cache[run_id] = logged_outputs(client, run_id)
        return cache[run_id]

    return outputs_of


def with_logged_metrics(rows: Sequence[Row], client, keys: Sequence[str]) -> list[dict]:
    """Rows whose missing ``keys`` are filled from their runs' logged metrics.

    A run trained in this flow returns the metrics it reports; some (the memory
    prediction) are only logged, and cached runs are read back whole.
    """
    filled = []
    for row in rows:
        row = dict(row)
        if row.get("run_id") and any(row.get(key) is None for key in keys):
            logged = client.get_run(row["run_id"]).data.metrics
            row.update({k: logged.get(k) for k in keys if row.get(k) is None})
        filled.append(row)
    return filled
