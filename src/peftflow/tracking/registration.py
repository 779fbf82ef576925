"""Logging a model of a run and registering it, exactly once, only if it reloads right.

The model is saved as an MLflow pyfunc (models from code: no pickle) with the saved
model folder as its artifact, and logged as an MLflow LoggedModel of its run (the runs
table's Models column; the run's final metrics are linked to it, as ``log_model``
links them), uploaded through an explicit client, reloaded from the store as a server
would load it and checked against the outputs it had before logging. Only then is it
registered. Registration retries transient store errors and never registers one
call's run twice.

Depends on: nothing in peftflow beyond errors, retry and its version.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

import peftflow
from peftflow.errors import RegistryError
from peftflow.retry import retry_transient

MODEL_ARTIFACT_PATH = "model"

# The MLmodel flavor that marks a model peftflow logged (with the version that logged it):
# what `peftflow predict` requires before it runs a model's stored code (serving/trust.py).
PEFTFLOW_FLAVOR = "peftflow"

# The LoggedModel's type: models of this kind are searched and compared together.
MODEL_TYPE = "peftflow"

# MLflow's limit on metrics in one log_batch call.
METRICS_PER_BATCH = 1000


LOGGED_CHECK_TAG = "peftflow.logged_model_check"


# One id per register_version call, on the version it created: finds what a failed attempt
# may have committed, so a retry never registers the run twice.
REGISTRATION_TAG = "peftflow.registration_id"


# What a served model needs at load time; pinned exactly so MLflow does not
# infer requirements (inference imports the model and asks for torchvision).
PINNED_PACKAGES = ("torch", "transformers", "peft", "pandas", "cloudpickle")


# A model reloaded from the store may differ from the original by float noise only.
PREDICTION_ATOL = 1e-5


# What a registry answers for a missing model or version (sqlite store and server alike);
# any other error (503, 403, ...) must not be read as "no champion yet".
NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    source: str


def default_pip_requirements() -> list[str]:
    """Exact pins of the installed :data:`PINNED_PACKAGES` (see :func:`exact_pins`)."""
    return exact_pins(PINNED_PACKAGES)


def exact_pins(packages: tuple[str, ...]) -> list[str]:
    """Exact pins of the installed ``packages``, without local labels like ``+cpu``.

    ``torch==2.13.0`` still matches ``2.13.0+cpu`` (PEP 440 ignores the local
    label), so the same requirements install on CPU and GPU machines.
    """
    pins = []
    for package in packages:
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
    code_paths: list[str] | None = None,
    flavor_info: dict[str, Any] | None = None,
) -> ModelVersionInfo:
    """Log ``python_model`` (with ``model_dir`` as its artifact) as run ``run_id``'s LoggedModel;
    register it.

    The model is saved locally and uploaded with an explicit client instead of
    ``mlflow.pyfunc.log_model``: that needs MLflow's process-global tracking
    URI and active run, which Prefect tasks in threads would race on. The run's
    status is left alone, so an open tracker decides when the run ends.

    ``check`` receives the ``predict`` of the model reloaded from the store (what a
    server would serve) and raises :class:`RegistryError` when its outputs are wrong;
    a model that fails it is tagged and never registered. ``code_paths``: the code the
    model carries (MLflow puts it on ``sys.path`` at load); ``flavor_info``: what the
    ``peftflow`` flavor of its MLmodel records besides the peftflow version.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise RegistryError(
            f"cannot log model: model_dir {model_dir} is not a folder; save the model there first."
        )
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = get_run(client, run_id)
    logged = client.create_logged_model(
        run.info.experiment_id,
        name=run.info.run_name or MODEL_ARTIFACT_PATH,
        source_run_id=run_id,
        params=dict(run.data.params),
        model_type=MODEL_TYPE,
    )
    try:
        saved_as = {
            "python_model": python_model,
            "artifacts": {"model_dir": str(model_dir)},
            "input_example": input_example,
            "signature": signature,
            "pip_requirements": pip_requirements or default_pip_requirements(),
            "code_paths": code_paths,
        }
        _upload_model(client, logged, run_id, saved_as, flavor_info or {})
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        _link_final_metrics(client, run_id, logged.model_id)
        if check is not None:
            _check_logged_model(client, run_id, logged, check)
    except BaseException:
        # A model that never became whole is marked so, never left "pending" in the UI.
        with contextlib.suppress(MlflowException):
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    # The storage location, not models:/<id>: MLflow's sqlite registry resolves that
    # through the process-global tracking URI, which may name another store.
    return register_version(client, model_name, logged.artifact_location, run_id, logged.model_id)


def _upload_model(
    client: MlflowClient, logged: Any, run_id: str, saved_as: dict, flavor_info: dict
) -> None:
    """Save the pyfunc (``saved_as``: save_model's arguments) marked as peftflow's, and upload
    it as LoggedModel ``logged``'s artifacts."""
    mlflow_model = Model(
        artifact_path=logged.artifact_location,
        model_uuid=logged.model_id,
        run_id=run_id,
        model_id=logged.model_id,
    )
    mlflow_model.add_flavor(PEFTFLOW_FLAVOR, peftflow_version=peftflow.__version__, **flavor_info)
    with tempfile.TemporaryDirectory() as scratch:
        saved = Path(scratch) / MODEL_ARTIFACT_PATH
        mlflow.pyfunc.save_model(saved, mlflow_model=mlflow_model, **saved_as)
        client.log_model_artifacts(logged.model_id, str(saved))


def _link_final_metrics(client: MlflowClient, run_id: str, model_id: str) -> None:
    """The run's final metrics (step 0) logged again with the model's id, as MLflow's own
    ``log_model`` does: the model's page and the registry show its evaluation."""
    run = client.get_run(run_id)
    linked = [
        Metric(metric.key, metric.value, metric.timestamp, metric.step, model_id=model_id)
        for key in run.data.metrics
        for metric in client.get_metric_history(run_id, key)
        if metric.step == 0 and metric.model_id is None
    ]
    for start in range(0, len(linked), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=linked[start : start + METRICS_PER_BATCH])


def download_logged_model(tracking_uri: str, model_id: str, target: str | Path) -> Path:
    """The artifacts of LoggedModel ``model_id`` (an MLmodel folder) under ``target``."""
    client = MlflowClient(tracking_uri)
    location = client.get_logged_model(model_id).artifact_location
    repository = get_artifact_repository(location, tracking_uri=tracking_uri)
    Path(target).mkdir(parents=True, exist_ok=True)
    return Path(repository.download_artifacts("", str(target)))


def register_version(
    client: MlflowClient, model_name: str, source: str, run_id: str, model_id: str | None = None
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
        return client.create_model_version(
            model_name, source, run_id=run_id, tags=tags, model_id=model_id
        )

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
    client: MlflowClient,
    run_id: str,
    logged: Any,
    check: Callable[[Callable[[pd.DataFrame], Any]], None],
) -> None:
    """Download the uploaded model, load it as MLflow serves it, let ``check`` judge its outputs."""
    with tempfile.TemporaryDirectory() as scratch:
        local = download_logged_model(client.tracking_uri, logged.model_id, scratch)
        served = load_pyfunc_in_process(local)
        try:
            check(served.predict)
        except RegistryError as error:
            client.set_tag(run_id, LOGGED_CHECK_TAG, "failed")
            raise RegistryError(
                f"the model logged in run {run_id} does not reload to the outputs it had before "
                f"logging, so it was not registered: {error}"
            ) from None
    client.set_tag(run_id, LOGGED_CHECK_TAG, "passed")


def load_pyfunc_in_process(folder: str | Path) -> Any:
    """``mlflow.pyfunc.load_model`` of a downloaded model, leaving ``sys.path`` as it was.

    MLflow prepends each loaded model's ``code/`` folder to ``sys.path`` and never takes it
    off. Here the folder is a temporary download that peftflow does not need (it is
    installed), so each load would leave a dead entry behind, inherited by every process
    spawned later. (The copy in it cannot shadow peftflow: see ``pyfunc_entry.py``.)
    """
    saved = list(sys.path)
    try:
        return mlflow.pyfunc.load_model(str(folder))
    finally:
        sys.path[:] = saved


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


def get_run(client: MlflowClient, run_id: str) -> Any:
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        raise RegistryError(
            f"MLflow run {run_id!r} not found in {client.tracking_uri}: {error.message}. "
            "Pass the run id returned by RunTracker.start against the same tracking URI."
        ) from None


def model_version(client: MlflowClient, model_name: str, model_version: str) -> Any:
    try:
        found = client.get_model_version(model_name, model_version)
    except MlflowException as error:
        raise_unless_not_found(error, f"reading {model_name!r} version {model_version}")
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


def raise_unless_not_found(error: MlflowException, doing: str) -> None:
    """Re-raise a registry failure as such; only a real "not found" may mean "absent"."""
    if error.error_code not in NOT_FOUND_CODES:
        raise RegistryError(
            f"model registry failed while {doing} ({error.error_code}: {error.message}); "
            "check the tracking server and retry, nothing was changed."
        ) from None
