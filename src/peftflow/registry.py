"""Model registry: log a pyfunc model, register it, promote it to ``champion`` only when earned.

Promotion is a gate, not a side effect of training: a candidate must carry the
required check tags on its run and beat the current champion's metric by a
margin. Every decision, promoted or refused, is written on the model version
(tags) and appended to the registered model's description, so the registry
itself explains why the champion is the champion. Aliases replace the
deprecated stages: ``champion`` serves, ``previous`` is the rollback target.

Runs may finish together. Registration retries transient store errors and never registers
one call's run twice; promotion and rollback run under the model's registry lock
(:mod:`peftflow.locks`) and read the champion only once they hold it, so concurrent
promotions end as if they had run one after another.
"""

from __future__ import annotations

import math
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from peftflow.errors import RegistryError
from peftflow.locks import RegistryLock
from peftflow.retry import retry_transient
from peftflow.tracking import check_tracking_server

MODEL_ARTIFACT_PATH = "model"
CHAMPION = "champion"
PREVIOUS = "previous"
LOGGED_CHECK_TAG = "peftflow.logged_model_check"
DECISION_TAG = "peftflow.promotion.decision"
REASON_TAG = "peftflow.promotion.reason"
# One id per register_version call, on the version it created: finds what a failed attempt
# may have committed, so a retry never registers the run twice.
REGISTRATION_TAG = "peftflow.registration_id"
# What a served model needs at load time; pinned exactly so MLflow does not
# infer requirements (inference imports the model and asks for torchvision).
PINNED_PACKAGES = ("torch", "transformers", "peft", "pandas", "cloudpickle")


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    source: str


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    reason: str
    candidate_metric: float
    champion_version: str | None
    champion_metric: float | None


# What a version's run must carry before the gate even looks at its metric: data and
# tokenisation checks, the saved folder's reload check, and the logged model's reload check.
GATE_TAGS = {
    "peftflow.checks_passed": "true",
    "peftflow.reload_check": "passed",
    LOGGED_CHECK_TAG: "passed",
}
# A model reloaded from the store may differ from the original by float noise only.
PREDICTION_ATOL = 1e-5
# What a registry answers for a missing model or version (sqlite store and server alike);
# any other error (503, 403, ...) must not be read as "no champion yet".
NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
# The promotion metric per task, when none is given (tag peftflow.task of the run).
TASK_METRICS = {"classification": "test_f1", "generation": "test_bleu"}


def default_metric(model_name: str, version: str, tracking_uri: str) -> str:
    """The promotion metric of ``version``'s task: test_f1 (classifiers), test_bleu (generators)."""
    check_tracking_server(tracking_uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = _get_run(client, _model_version(client, model_name, version).run_id)
    return TASK_METRICS.get(run.data.tags.get("peftflow.task", "classification"), "test_f1")


def default_pip_requirements() -> list[str]:
    """Exact pins of the installed runtime packages, without local labels like ``+cpu``.

    ``torch==2.13.0`` still matches ``2.13.0+cpu`` (PEP 440 ignores the local
    label), so the same requirements install on CPU and GPU machines.
    """
    pins = []
    for package in PINNED_PACKAGES:
        try:
            pins.append(f"{package}=={metadata.version(package).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def log_and_register_model(
    run_id: str,
    model_dir: Path,
    model_name: str,
    tracking_uri: str,
    python_model: mlflow.pyfunc.PythonModel | str | Path,
    input_example: Any,
    signature: Any = None,
    pip_requirements: list[str] | None = None,
    check: Callable[[Callable[[pd.DataFrame], Any]], None] | None = None,
) -> ModelVersionInfo:
    """Save ``python_model`` (with ``model_dir`` as its artifact) into run ``run_id``; register it.

    The model is saved locally and uploaded with an explicit client instead of
    ``mlflow.pyfunc.log_model``: that needs MLflow's process-global tracking
    URI and active run, which Prefect tasks in threads would race on. The run's
    status is left alone, so an open tracker decides when the run ends.

    ``check`` receives the ``predict`` of the model reloaded from the store (what a
    server would serve) and raises :class:`RegistryError` when its outputs are wrong;
    a model that fails it is tagged and never registered.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise RegistryError(
            f"cannot log model: model_dir {model_dir} is not a folder; save the model there first."
        )
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = _get_run(client, run_id)
    with tempfile.TemporaryDirectory() as scratch:
        saved = Path(scratch) / MODEL_ARTIFACT_PATH
        mlflow.pyfunc.save_model(
            saved,
            python_model=python_model,
            artifacts={"model_dir": str(model_dir)},
            input_example=input_example,
            signature=signature,
            pip_requirements=pip_requirements or default_pip_requirements(),
        )
        client.log_artifacts(run_id, str(saved), MODEL_ARTIFACT_PATH)
    if check is not None:
        _check_logged_model(client, run_id, check)
    return register_version(
        client, model_name, f"{run.info.artifact_uri}/{MODEL_ARTIFACT_PATH}", run_id
    )


def register_version(
    client: MlflowClient, model_name: str, source: str, run_id: str
) -> ModelVersionInfo:
    """Register ``source``, the model logged in ``run_id``, as a new version of ``model_name``.

    Safe when many runs register at once: the store numbers versions atomically (a unique
    key, retried on conflict), and transient store errors are retried with backoff. A store
    can commit a create and still report an error (and MLflow's HTTP client resends a POST
    after a 5xx), so a retry first looks for the version this call tagged, and extra
    versions carrying the same tag are deleted: one call registers its run exactly once.
    """
    _ensure_registered_model(client, model_name)
    registration_id = uuid.uuid4().hex
    attempts: list[int] = []

    def create() -> Any:
        committed = _registered_by(client, model_name, run_id, registration_id) if attempts else []
        attempts.append(1)
        if committed:  # the failed attempt was written after all
            return committed[0]
        tags = {REGISTRATION_TAG: registration_id}
        return client.create_model_version(model_name, source, run_id=run_id, tags=tags)

    registered = retry_transient(create, f"registering run {run_id} as a version of {model_name!r}")
    _drop_duplicates(client, model_name, run_id, registration_id, str(registered.version))
    return ModelVersionInfo(registered.name, str(registered.version), registered.source)


def _registered_by(
    client: MlflowClient, model_name: str, run_id: str, registration_id: str
) -> list[Any]:
    """Versions of ``run_id`` tagged with ``registration_id``, lowest number first.

    Filtered by run id only (hex, safe in a filter); a model name may hold a quote.
    """
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    found = [
        v
        for v in versions
        if v.name == model_name and v.tags.get(REGISTRATION_TAG) == registration_id
    ]
    return sorted(found, key=lambda v: int(v.version))


def _drop_duplicates(
    client: MlflowClient, model_name: str, run_id: str, registration_id: str, keep: str
) -> None:
    """Delete versions one registration created besides ``keep`` (resent POSTs)."""
    doing = f"checking run {run_id}'s registration in {model_name!r} for duplicates"
    found = retry_transient(
        lambda: _registered_by(client, model_name, run_id, registration_id), doing
    )
    for duplicate in found:
        if str(duplicate.version) != keep:
            retry_transient(
                lambda d=duplicate: client.delete_model_version(model_name, str(d.version)),
                f"deleting duplicate version {duplicate.version} of {model_name!r}",
            )


def _check_logged_model(
    client: MlflowClient, run_id: str, check: Callable[[Callable[[pd.DataFrame], Any]], None]
) -> None:
    """Download the uploaded model, load it as MLflow serves it, let ``check`` judge its outputs."""
    with tempfile.TemporaryDirectory() as scratch:
        local = client.download_artifacts(run_id, MODEL_ARTIFACT_PATH, scratch)
        served = mlflow.pyfunc.load_model(local)
        try:
            check(served.predict)
        except RegistryError as error:
            client.set_tag(run_id, LOGGED_CHECK_TAG, "failed")
            raise RegistryError(
                f"the model logged in run {run_id} does not reload to the outputs it had before "
                f"logging, so it was not registered: {error}"
            ) from None
    client.set_tag(run_id, LOGGED_CHECK_TAG, "passed")


def assert_same_predictions(
    expected: pd.DataFrame, actual: pd.DataFrame, atol: float = PREDICTION_ATOL
) -> None:
    """Numbers equal within ``atol`` (float noise), everything else exactly; else RegistryError."""
    actual = pd.DataFrame(actual).reset_index(drop=True)
    expected = expected.reset_index(drop=True)
    if list(actual.columns) != list(expected.columns) or len(actual) != len(expected):
        raise RegistryError(
            f"expected columns {list(expected.columns)} x {len(expected)} rows, "
            f"got {list(actual.columns)} x {len(actual)} rows"
        )
    for column in expected.columns:
        want, got = expected[column], actual[column]
        if pd.api.types.is_numeric_dtype(want) and pd.api.types.is_numeric_dtype(got):
            gap = float(np.max(np.abs(want.to_numpy(float) - got.to_numpy(float)), initial=0.0))
            if not gap <= atol:
                raise RegistryError(f"column {column!r} differs by up to {gap:.2e} (> {atol:g})")
        elif want.astype(str).tolist() != got.astype(str).tolist():
            row = next(
                i for i, (w, g) in enumerate(zip(want, got, strict=True)) if str(w) != str(g)
            )
            raise RegistryError(
                f"column {column!r} differs first at row {row}: {want[row]!r} != {got[row]!r}"
            )


def _ensure_registered_model(client: MlflowClient, model_name: str) -> None:
    def create() -> None:
        try:
            client.create_registered_model(model_name)
        except MlflowException as error:
            # Another run created it first (or our own retried create did): nothing to do.
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise

    retry_transient(create, f"creating registered model {model_name!r}")


def _get_run(client: MlflowClient, run_id: str) -> Any:
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        raise RegistryError(
            f"MLflow run {run_id!r} not found in {client.tracking_uri}: {error.message}. "
            "Pass the run id returned by RunTracker.start against the same tracking URI."
        ) from None


def _run_metric(client: MlflowClient, run_id: str, metric: str, who: str) -> float:
    metrics = _get_run(client, run_id).data.metrics
    if metric not in metrics:
        raise RegistryError(
            f"{who} run {run_id} has no metric {metric!r} (it has: {sorted(metrics) or 'none'}); "
            f"log {metric!r} on the run before promoting, or pass metric= one it has."
        )
    return metrics[metric]


def _model_version(client: MlflowClient, model_name: str, model_version: str) -> Any:
    try:
        found = client.get_model_version(model_name, model_version)
    except MlflowException as error:
        _raise_unless_not_found(error, f"reading {model_name!r} version {model_version}")
        raise RegistryError(
            f"model {model_name!r} has no version {model_version!r}; "
            "register it with log_and_register_model first."
        ) from None
    if not found.run_id:
        raise RegistryError(
            f"model {model_name!r} version {model_version} has no source run, so its metrics "
            "cannot be read; register versions from a tracked run."
        )
    return found


def _aliases(client: MlflowClient, model_name: str) -> dict[str, str]:
    """Alias -> version of a registered model; empty when the model is not registered."""
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as error:
        _raise_unless_not_found(error, f"reading the aliases of {model_name!r}")
        return {}
    return {alias: str(v) for alias, v in model.aliases.items()}


def _raise_unless_not_found(error: MlflowException, doing: str) -> None:
    """Re-raise a registry failure as such; only a real "not found" may mean "absent"."""
    if error.error_code not in NOT_FOUND_CODES:
        raise RegistryError(
            f"model registry failed while {doing} ({error.error_code}: {error.message}); "
            "check the tracking server and retry, nothing was changed."
        ) from None


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


def _record_decision(
    client: MlflowClient, model_name: str, model_version: str, decision: str, reason: str
) -> None:
    """Write the decision on the version's tags and as a timestamped line of the description."""
    for key, value in ((DECISION_TAG, decision), (REASON_TAG, reason)):
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


def _gate(
    client: MlflowClient,
    model_name: str,
    version: str,
    metric: str,
    margin: float,
    require_tags: dict[str, str],
) -> PromotionDecision:
    """The decision for ``version`` against the champion as the registry holds it now."""
    candidate = _model_version(client, model_name, version)
    candidate_metric = _run_metric(client, candidate.run_id, metric, "candidate")
    champion_version = _aliases(client, model_name).get(CHAMPION)
    champion_metric = None
    if champion_version is not None:
        champion = _model_version(client, model_name, champion_version)
        champion_metric = _run_metric(client, champion.run_id, metric, "champion")

    missing = _missing_tags(_get_run(client, candidate.run_id).data.tags, require_tags)
    if champion_version == version:
        promoted, reason = False, f"version {version} is already the champion"
    elif missing:
        promoted, reason = False, f"candidate run fails required tags: {', '.join(missing)}"
    else:
        promoted, reason = _judge(
            candidate_metric, champion_version, champion_metric, metric, margin
        )
    return PromotionDecision(promoted, reason, candidate_metric, champion_version, champion_metric)


def promote_if_better(
    model_name: str,
    version: str,
    tracking_uri: str,
    metric: str = "test_f1",
    margin: float = 0.0,
    require_tags: dict[str, str] | None = None,
) -> PromotionDecision:
    """Give ``version`` the ``champion`` alias if it passes the gate; record the decision.

    The gate: every ``require_tags`` entry is on the candidate's run, and its
    ``metric`` (higher is better) beats the champion's by more than ``margin``.
    On promotion the old champion becomes ``previous`` (the rollback target).

    The gate runs under the model's registry lock and reads the champion only once it
    holds it: concurrent promotions of one model (threads, processes, hosts) take turns
    in arrival order and end as they would one after another.
    """
    version = str(version)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    _model_version(client, model_name, version)  # fail fast, before taking the lock
    with RegistryLock(client, model_name, f"promote v{version}") as lock:
        decision = _gate(client, model_name, version, metric, margin, require_tags or {})
        lock.check()
        if decision.promoted:
            # previous first: a failure between the two writes leaves champion untouched.
            if decision.champion_version is not None:
                _set_alias(client, model_name, PREVIOUS, decision.champion_version)
            _set_alias(client, model_name, CHAMPION, version)
            lock.check()
        verdict = "promoted" if decision.promoted else "refused"
        _record_decision(client, model_name, version, verdict, decision.reason)
    return decision


def promote(
    model_name: str,
    version: str,
    tracking_uri: str,
    metric: str | None = None,
    margin: float = 0.0,
) -> PromotionDecision:
    """The gate users run (CLI, promotion flow): every GATE_TAGS check plus the metric.

    ``metric`` defaults to the candidate's task metric (test_f1 or test_bleu).
    """
    if margin < 0 or not math.isfinite(margin):
        raise RegistryError(f"margin must be a finite number >= 0, got {margin}")
    check_tracking_server(tracking_uri)
    metric = metric or default_metric(model_name, version, tracking_uri)
    return promote_if_better(model_name, version, tracking_uri, metric, margin, GATE_TAGS)


def current_champion(
    model_name: str, tracking_uri: str, metric: str = "test_f1"
) -> tuple[str, float | None] | None:
    """(version, its run's ``metric`` or None) of the champion; None when there is no champion."""
    check_tracking_server(tracking_uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    champion_version = _aliases(client, model_name).get(CHAMPION)
    if champion_version is None:
        return None
    champion = _model_version(client, model_name, champion_version)
    return champion_version, _get_run(client, champion.run_id).data.metrics.get(metric)


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
        _record_decision(
            client, model_name, demoted, "rolled_back", f"champion returned to v{restored}"
        )
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
