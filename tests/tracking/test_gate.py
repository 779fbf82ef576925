"""The gate with per-example evidence: the interval's lower bound decides, small test splits
cannot promote, and the interval is recorded (evidence given as plain functions here; how it
is computed from runs is tests/pipeline/test_gate_evidence.py)."""

from __future__ import annotations

import json

from peftflow.evaluation.paired_bootstrap import PairedInterval
from peftflow.tracking.promotion import (
    INTERVAL_TAG,
    REASON_TAG,
    GateEvidence,
    promote_if_better,
)
from tests.tracking import test_registry
from tests.tracking.test_registry import MODEL, aliases, version_tags

new_version = test_registry.new_version  # the fixture: a version whose run has given metrics


def interval(low: float, high: float, n: int = 200) -> PairedInterval:
    return PairedInterval("test_f1", n, 0.9, 0.85, low, high, 0.95, 1000)


def gate(version, tracking_uri, evidence, margin=0.0, minimum=30):
    return promote_if_better(
        MODEL,
        version,
        tracking_uri,
        margin=margin,
        evidence_for=evidence,
        min_test_examples=minimum,
    )


def test_a_first_version_needs_enough_test_examples(new_version, tracking_uri):
    few = new_version({"test_f1": 0.99})
    decision = gate(few, tracking_uri, lambda champion: GateEvidence(8))
    assert not decision.promoted and decision.test_examples == 8
    assert "8 examples, fewer than tracking.promote_min_test_examples=30" in decision.reason
    assert "stays registered" in version_tags(tracking_uri, few)[REASON_TAG]
    enough = new_version({"test_f1": 0.5})
    assert gate(enough, tracking_uri, lambda champion: GateEvidence(30)).promoted


def test_the_lower_bound_must_clear_the_margin(new_version, tracking_uri):
    champion = new_version({"test_f1": 0.8})
    assert gate(champion, tracking_uri, lambda seen: GateEvidence(200)).promoted
    seen_by_gate = []

    def straddles(seen):
        seen_by_gate.append(seen)
        return GateEvidence(200, interval(-0.01, 0.11), "its logged test outputs")

    better_on_average = new_version({"test_f1": 0.95})
    decision = gate(better_on_average, tracking_uri, straddles)
    assert not decision.promoted and seen_by_gate == [champion]
    assert "[-0.0100, +0.1100]" in decision.reason and "not shown better" in decision.reason
    assert aliases(tracking_uri)["champion"] == champion

    clears = new_version({"test_f1": 0.95})
    decision = gate(clears, tracking_uri, lambda seen: GateEvidence(200, interval(0.02, 0.09)))
    assert decision.promoted and aliases(tracking_uri)["champion"] == clears
    recorded = json.loads(version_tags(tracking_uri, clears)[INTERVAL_TAG])
    assert (recorded["low"], recorded["high"], recorded["level"]) == (0.02, 0.09, 0.95)

    margin = new_version({"test_f1": 0.99})
    assert not gate(
        margin, tracking_uri, lambda s: GateEvidence(200, interval(0.02, 0.2)), 0.03
    ).promoted


def test_without_per_example_outputs_the_gate_says_it_compared_logged_metrics(
    new_version, tracking_uri
):
    new_version_first = new_version({"test_f1": 0.8})
    assert gate(new_version_first, tracking_uri, lambda seen: None).promoted
    decision = gate(new_version({"test_f1": 0.9}), tracking_uri, lambda seen: None)
    assert decision.promoted and "logged metrics only" in decision.reason


def test_evidence_is_recomputed_when_the_champion_moves_meanwhile(new_version, tracking_uri):
    first, second = new_version({"test_f1": 0.8}), new_version({"test_f1": 0.85})
    assert gate(first, tracking_uri, lambda seen: GateEvidence(200)).promoted
    candidate = new_version({"test_f1": 0.95})
    calls = []

    def evidence(seen):
        calls.append(seen)
        if len(calls) == 1:  # another promotion lands while this one scores
            promote_if_better(
                MODEL,
                second,
                tracking_uri,
                evidence_for=lambda s: GateEvidence(200, interval(0.01, 0.1)),
            )
        return GateEvidence(200, interval(0.01, 0.1))

    assert gate(candidate, tracking_uri, evidence).promoted
    assert calls == [first, second]


def test_a_champion_that_cannot_be_scored_refuses_with_the_reason(new_version, tracking_uri):
    champion = new_version({"test_f1": 0.5})
    assert gate(champion, tracking_uri, lambda seen: GateEvidence(200)).promoted
    broken = GateEvidence(200, unscored="the base model 'minilm' is not available here")
    decision = gate(new_version({"test_f1": 0.99}), tracking_uri, lambda seen: broken)
    assert not decision.promoted and aliases(tracking_uri)["champion"] == champion
    assert f"champion v{champion} could not be scored" in decision.reason
    assert "'minilm' is not available here" in decision.reason
