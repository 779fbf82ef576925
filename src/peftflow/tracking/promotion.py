"""Promotion through a gate: ``champion`` moves only to a version that earns it.

Promotion is a gate, not a side effect of training: a candidate must carry the
required check tags on its run and beat the current champion's metric by a
margin. Given per-example evidence (:class:`GateEvidence`, built by
``peftflow.pipeline.gate``), the comparison is made on the same test examples and the
*lower bound* of a paired bootstrap interval of the improvement must clear the margin;
a test split under a minimum size cannot promote at all.

Every decision, promoted or refused, is written on the model version (tags) and appended to
the registered model's description, so the registry itself explains why the champion is the
champion. Aliases replace the deprecated stages: ``champion`` serves, ``previous`` is the
rollback target.

Promotion and rollback run under the model's registry lock (:mod:`.locks`) and read
the champion only once they hold it, so concurrent promotions end as if they had run
one after another.

Depends on: config, evaluation (paired_bootstrap).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from peftflow.config import default_promote_metric
from peftflow.errors import RegistryError
from peftflow.evaluation.paired_bootstrap import PairedInterval
from peftflow.retry import retry_transient
from peftflow.tracking.locks import RegistryLock
from peftflow.tracking.registration import (
    LOGGED_CHECK_TAG,
    NOT_FOUND_CODES,
    get_run,
    model_version,
    raise_unless_not_found,
)
from peftflow.tracking.runs import check_tracking_server

CHAMPION = "champion"


PREVIOUS = "previous"


DECISION_TAG = "peftflow.promotion.decision"


REASON_TAG = "peftflow.promotion.reason"


INTERVAL_TAG = "peftflow.promotion.interval"


@dataclass(frozen=True)
class GateEvidence:
    """What the candidate's per-example test outputs say, against one champion (or none)."""

    test_examples: int
    interval: PairedInterval | None = None  # None: no champion to compare with
    champion_scored: str = ""  # how the champion's outputs on those examples were obtained
    unscored: str = ""  # why the champion could not be scored on them (then: refused)


# The evidence for a champion version (None: no champion yet); returns None when the
# candidate has no per-example outputs, and the gate then compares logged metrics only.
EvidenceFor = Callable[[str | None], GateEvidence | None]

# How often the gate recomputes its evidence when the champion moved meanwhile.
EVIDENCE_ATTEMPTS = 3


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    reason: str
    candidate_metric: float
    champion_version: str | None
    champion_metric: float | None
    interval: PairedInterval | None = None
    test_examples: int | None = None


# What a version's run must carry before the gate even looks at its metric: data and
# tokenisation checks, the saved folder's reload check, and the logged model's reload check.
GATE_TAGS = {
    "peftflow.checks_passed": "true",
    "peftflow.reload_check": "passed",
    LOGGED_CHECK_TAG: "passed",
}


def default_metric(model_name: str, version: str, tracking_uri: str) -> str:
    """The promotion metric of ``version``'s task: test_f1 (classifiers), test_bleu (generators)."""
    check_tracking_server(tracking_uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = get_run(client, model_version(client, model_name, version).run_id)
    return default_promote_metric(run.data.tags.get("peftflow.task", "classification"))


def _run_metric(client: MlflowClient, run_id: str, metric: str, who: str) -> float:
    metrics = get_run(client, run_id).data.metrics
    if metric not in metrics:
        raise RegistryError(
            f"{who} run {run_id} has no metric {metric!r} (it has: {sorted(metrics) or 'none'}); "
            f"log {metric!r} on the run before promoting, or pass metric= one it has."
        )
    return metrics[metric]


def _aliases(client: MlflowClient, model_name: str) -> dict[str, str]:
    """Alias -> version of a registered model; empty when the model is not registered."""
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as error:
        raise_unless_not_found(error, f"reading the aliases of {model_name!r}")
        return {}
    return {alias: str(v) for alias, v in model.aliases.items()}


def _missing_tags(run_tags: dict[str, str], require_tags: dict[str, str]) -> list[str]:
    return [
        f"{key}={expected} (found {run_tags.get(key)!r})"
        for key, expected in require_tags.items()
        if run_tags.get(key) != expected
    ]


def _judge(
    candidate_metric: float,
    champion_version: str | None,
    champion_metric: float | None,
    metric: str,
    margin: float,
) -> tuple[bool, str]:
    """(promote?, why) from the metrics alone; the tag gate runs before this."""
    if not math.isfinite(candidate_metric):
        return False, f"candidate {metric}={candidate_metric} is not a finite number"
    if champion_version is None:
        return True, f"no champion yet; candidate {metric}={candidate_metric:.4f}"
    comparison = (
        f"candidate {metric}={candidate_metric:.4f} vs champion v{champion_version} "
        f"{champion_metric:.4f} + margin {margin:.4f}"
    )
    if candidate_metric > champion_metric + margin:
        return True, f"{comparison}: better"
    return False, f"{comparison}: not better"


def _judge_evidence(
    evidence: GateEvidence,
    candidate_metric: float,
    champion_version: str | None,
    policy: GatePolicy,
) -> tuple[bool, str]:
    """(promote?, why) from per-example evidence: enough examples, and the interval's lower
    bound above the margin."""
    metric, margin, minimum = policy.metric, policy.margin, policy.min_test_examples
    if evidence.test_examples < minimum:
        return False, (
            f"the test split has {evidence.test_examples} examples, fewer than "
            f"tracking.promote_min_test_examples={minimum}: too few to tell a better model from "
            "luck. The version stays registered; score it on a larger test split to promote it"
        )
    if evidence.unscored:
        return False, (
            f"champion v{champion_version} could not be scored on the candidate's test "
            f"examples ({evidence.unscored}); fix that and run the promotion again"
        )
    interval = evidence.interval
    if champion_version is None or interval is None:
        return True, (
            f"no champion yet; candidate {metric}={candidate_metric:.4f} "
            f"on {evidence.test_examples} test examples"
        )
    comparison = (
        f"candidate {metric}={interval.candidate:.4f} vs champion v{champion_version} "
        f"{interval.champion:.4f} on the same examples ({evidence.champion_scored}): "
        f"{interval.describe()}"
    )
    if interval.low > margin:
        return True, f"{comparison}; lower bound clears margin {margin:.4f}: better"
    return False, f"{comparison}; lower bound does not clear margin {margin:.4f}: not shown better"


def _record_decision(
    client: MlflowClient, model_name: str, model_version: str, decision: PromotionDecision
) -> None:
    verdict = "promoted" if decision.promoted else "refused"
    tags = {DECISION_TAG: verdict, REASON_TAG: decision.reason}
    if decision.interval is not None:
        tags[INTERVAL_TAG] = json.dumps(dataclasses.asdict(decision.interval))
    _record(client, model_name, model_version, verdict, decision.reason, tags)


def _record(
    client: MlflowClient,
    model_name: str,
    model_version: str,
    decision: str,
    reason: str,
    extra_tags: dict[str, str] | None = None,
) -> None:
    """Write the decision on the version's tags and as a timestamped line of the description."""
    tags = {DECISION_TAG: decision, REASON_TAG: reason, **(extra_tags or {})}
    for key, value in tags.items():
        retry_transient(
            lambda k=key, v=value: client.set_model_version_tag(model_name, model_version, k, v),
            f"tagging {model_name!r} version {model_version} with {key}",
        )
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    line = f"{stamp} v{model_version} {decision}: {reason}"

    def append() -> None:
        # Read-modify-write: safe under the registry lock; a retry after a write that
        # committed finds the line already there and adds nothing.
        description = client.get_registered_model(model_name).description or ""
        if line not in description.splitlines():
            client.update_registered_model(model_name, description=f"{description}{line}\n")

    retry_transient(append, f"appending the decision to the description of {model_name!r}")


def _set_alias(client: MlflowClient, model_name: str, alias: str, version: str) -> None:
    retry_transient(
        lambda: client.set_registered_model_alias(model_name, alias, version),
        f"pointing alias {alias!r} of {model_name!r} at version {version}",
    )


@dataclass(frozen=True)
class GatePolicy:
    """What the gate requires besides the tags: the metric, the margin, and with evidence
    the minimum number of test examples."""

    metric: str
    margin: float
    require_tags: dict[str, str]
    min_test_examples: int = 0


def _gate(
    client: MlflowClient,
    model_name: str,
    version: str,
    policy: GatePolicy,
    evidence: tuple[str | None, GateEvidence | None] | None,
) -> PromotionDecision | None:
    """The decision for ``version`` against the champion as the registry holds it now.

    ``evidence``: (the champion it was computed against, the evidence); None when it
    moved since (the caller recomputes).
    """
    metric = policy.metric
    candidate = model_version(client, model_name, version)
    candidate_metric = _run_metric(client, candidate.run_id, metric, "candidate")
    champion_version = _aliases(client, model_name).get(CHAMPION)
    if evidence is not None and evidence[0] != champion_version:
        return None
    champion_metric = None
    if champion_version is not None:
        champion = model_version(client, model_name, champion_version)
        champion_metric = _run_metric(client, champion.run_id, metric, "champion")

    found = evidence[1] if evidence else None
    missing = _missing_tags(get_run(client, candidate.run_id).data.tags, policy.require_tags)
    if champion_version == version:
        promoted, reason = False, f"version {version} is already the champion"
    elif missing:
        promoted, reason = False, f"candidate run fails required tags: {', '.join(missing)}"
    elif found is not None:
        promoted, reason = _judge_evidence(found, candidate_metric, champion_version, policy)
    else:
        promoted, reason = _judge(
            candidate_metric, champion_version, champion_metric, metric, policy.margin
        )
        if evidence is not None:
            reason += " (the candidate logged no per-example test outputs: logged metrics only)"
    return PromotionDecision(
        promoted,
        reason,
        candidate_metric,
        champion_version,
        champion_metric,
        found.interval if found else None,
        found.test_examples if found else None,
    )


def promote_if_better(
    model_name: str,
    version: str,
    tracking_uri: str,
    metric: str = "test_f1",
    margin: float = 0.0,
    require_tags: dict[str, str] | None = None,
    evidence_for: EvidenceFor | None = None,
    min_test_examples: int = 0,
) -> PromotionDecision:
    """Give ``version`` the ``champion`` alias if it passes the gate; record the decision.

    The gate: every ``require_tags`` entry is on the candidate's run, and its
    ``metric`` (higher is better) beats the champion's by more than ``margin``. With
    ``evidence_for``, "beats" means the lower bound of the paired interval of the
    improvement on the same test examples exceeds ``margin``, and a candidate scored on
    fewer than ``min_test_examples`` examples is refused. On promotion the old champion
    becomes ``previous`` (the rollback target).

    The gate runs under the model's registry lock and reads the champion only once it
    holds it: concurrent promotions of one model (threads, processes, hosts) take turns
    in arrival order and end as they would one after another. Evidence (which may mean
    re-scoring the champion) is computed before the lock, and again if the champion
    moved meanwhile.
    """
    version = str(version)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    model_version(client, model_name, version)  # fail fast, before taking the lock
    policy = GatePolicy(metric, margin, require_tags or {}, min_test_examples)
    for _ in range(EVIDENCE_ATTEMPTS):
        evidence = None
        if evidence_for is not None:
            seen = _aliases(client, model_name).get(CHAMPION)
            evidence = (seen, evidence_for(seen) if seen != version else None)
        with RegistryLock(client, model_name, f"promote v{version}") as lock:
            decision = _gate(client, model_name, version, policy, evidence)
            if decision is None:  # the champion moved while the evidence was computed
                continue
            lock.check()
            _apply(client, model_name, version, decision)
            lock.check()
            _record_decision(client, model_name, version, decision)
        return decision
    raise RegistryError(
        f"the champion of {model_name!r} kept moving while the gate scored v{version} against "
        f"it ({EVIDENCE_ATTEMPTS} times); run the promotion again when other promotions are done"
    )


def _apply(client: MlflowClient, model_name: str, version: str, decision: PromotionDecision):
    """Move the aliases of a promotion; nothing for a refusal."""
    if not decision.promoted:
        return
    # previous first: a failure between the two writes leaves champion untouched.
    if decision.champion_version is not None:
        _set_alias(client, model_name, PREVIOUS, decision.champion_version)
    _set_alias(client, model_name, CHAMPION, version)


def promote(
    model_name: str,
    version: str,
    tracking_uri: str,
    metric: str | None = None,
    margin: float = 0.0,
    evidence_for: Callable[[str], EvidenceFor] | None = None,
    min_test_examples: int = 0,
) -> PromotionDecision:
    """The gate users run (CLI, promotion flow): every GATE_TAGS check plus the metric.

    ``metric`` defaults to the candidate's task metric (test_f1 or test_bleu);
    ``evidence_for(metric)`` builds the per-example evidence for that metric.
    """
    if margin < 0 or not math.isfinite(margin):
        raise RegistryError(f"margin must be a finite number >= 0, got {margin}")
    check_tracking_server(tracking_uri)
    metric = metric or default_metric(model_name, version, tracking_uri)
    evidence = evidence_for(metric) if evidence_for else None
    return promote_if_better(
        model_name, version, tracking_uri, metric, margin, GATE_TAGS, evidence, min_test_examples
    )


def current_champion(
    model_name: str, tracking_uri: str, metric: str = "test_f1"
) -> tuple[str, float | None] | None:
    """(version, its run's ``metric`` or None) of the champion; None when there is no champion."""
    check_tracking_server(tracking_uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    champion_version = _aliases(client, model_name).get(CHAMPION)
    if champion_version is None:
        return None
    champion = model_version(client, model_name, champion_version)
    return champion_version, get_run(client, champion.run_id).data.metrics.get(metric)


def rollback(model_name: str, tracking_uri: str) -> str:
    """Move ``champion`` back to the ``previous`` version and return that version.

    ``previous`` is consumed, so a second rollback needs a new promotion first
    (rolling back twice would otherwise bounce between two versions). Runs under the
    same registry lock as promotion, so it never interleaves with one.
    """
    check_tracking_server(tracking_uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    _rollback_pair(client, model_name)  # fail fast, before taking the lock
    with RegistryLock(client, model_name, "rollback") as lock:
        demoted, restored = _rollback_pair(client, model_name)
        lock.check()
        _set_alias(client, model_name, CHAMPION, restored)
        retry_transient(
            lambda: _delete_alias(client, model_name, PREVIOUS),
            f"deleting alias {PREVIOUS!r} of {model_name!r}",
        )
        _record(client, model_name, demoted, "rolled_back", f"champion returned to v{restored}")
    return restored


def _rollback_pair(client: MlflowClient, model_name: str) -> tuple[str, str]:
    """(champion, previous) versions; RegistryError when either alias is missing."""
    aliases = _aliases(client, model_name)
    if PREVIOUS not in aliases or CHAMPION not in aliases:
        raise RegistryError(
            f"cannot roll back model {model_name!r}: it needs both a {CHAMPION!r} and a "
            f"{PREVIOUS!r} alias (has {sorted(aliases) or 'none'}). Promote a version first, "
            f"or set the alias by hand with MlflowClient.set_registered_model_alias."
        )
    return aliases[CHAMPION], aliases[PREVIOUS]


def _delete_alias(client: MlflowClient, model_name: str, alias: str) -> None:
    try:
        client.delete_registered_model_alias(model_name, alias)
    except MlflowException as error:
        if error.error_code not in NOT_FOUND_CODES:  # gone already (a retry): what we wanted
            raise
