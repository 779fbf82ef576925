"""MLflow run tracking: where runs go, what every run is tagged with, and one run's lifecycle.

Runs are written through :class:`mlflow.MlflowClient` with an explicit tracking
URI rather than MLflow's global "active run", so Prefect tasks running in the
same process cannot log into each other's runs. Metrics are sent in one
``log_batch`` call per step because a single ``log_metric`` costs ~9 ms on the
sqlite store.

Depends on: nothing in peftflow beyond tracking.lineage.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

import peftflow
from peftflow.errors import PeftflowError
from peftflow.gitinfo import git_commit, git_dirty
from peftflow.tracking.lineage import mark_model_training, source_tags

RUN_KEY_TAG = "peftflow.run_key"
MODEL_DIR_TAG = "peftflow.model_dir"
ERROR_TAG = "peftflow.error"
# "epoch E step S": the checkpoint a run resumed from (see RunTracker.resume).
RESUMED_TAG = "peftflow.resumed_from"
TRUNCATION_MARK = "...[truncated]"
# Recorded on every run (tags peftflow.versions.<package>, plus python): what produced it.
VERSIONED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "mlflow",
    "prefect",
    "dvc",
    "great_expectations",
)
SERVER_CONNECT_TIMEOUT_S = 5.0


def resolve_tracking_uri(uri: str | None, root: Path) -> str:
    """Explicit ``uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<root>/mlflow.db``.

    The default path is absolute so that a flow started from another working
    directory still writes to the project's store.
    """
    if uri:
        return uri
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env:
        return from_env
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def _is_local_sqlite(tracking_uri: str) -> bool:
    return tracking_uri.startswith("sqlite:")


def check_tracking_server(tracking_uri: str, timeout: float = SERVER_CONNECT_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds, naming the fix, when an http(s) tracking server is down.

    MLflow's client retries a refused connection with backoff for about four
    minutes before it raises (and the registry then reads the failure as "no such
    model"). A TCP connect tells a stopped server or a wrong URL at once; any
    other store (sqlite, file) is local and passes untouched.
    """
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        if not host:
            raise ValueError("no host name")
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except (OSError, ValueError) as error:
        raise PeftflowError(
            f"MLflow tracking server {tracking_uri} is not reachable ({error}). Start it "
            "(e.g. `mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 "
            "--port 5000`), fix tracking.tracking_uri or $MLFLOW_TRACKING_URI, or unset both "
            "to use the project's mlflow.db."
        ) from None


def ensure_experiment(name: str, tracking_uri: str, root: Path) -> str:
    """Id of the experiment ``name``, created on first use.

    With a local sqlite store, artifacts go to ``<root>/mlruns`` (MLflow would
    otherwise pick a folder relative to the current directory). A tracking
    server keeps its own artifact default (its proxied artifact store).
    """
    check_tracking_server(tracking_uri)
    client = MlflowClient(tracking_uri)
    existing = client.get_experiment_by_name(name)
    if existing is None:
        existing = _create_experiment(client, name, tracking_uri, root)
    experiment_id = _usable_experiment_id(existing)
    mark_model_training(client, experiment_id, existing.tags)
    return experiment_id


def _create_experiment(client: MlflowClient, name: str, tracking_uri: str, root: Path) -> Any:
    location = (
        (Path(root).resolve() / "mlruns").as_uri() if _is_local_sqlite(tracking_uri) else None
    )
    try:
        client.create_experiment(name, artifact_location=location)
    except MlflowException as error:
        # Another task created it between our lookup and create: use theirs.
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    return client.get_experiment_by_name(name)


def _usable_experiment_id(experiment: Any) -> str:
    if experiment.lifecycle_stage == "deleted":
        raise PeftflowError(
            f"MLflow experiment {experiment.name!r} (id {experiment.experiment_id}) is deleted. "
            f"Restore it with `mlflow experiments restore --experiment-id "
            f"{experiment.experiment_id}` or choose another experiment name."
        )
    return experiment.experiment_id


def _package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not-installed"


def standard_tags(
    run_key: str, data_md5: str, config_hash: str, root: Path, entry_point: str = ""
) -> dict[str, str]:
    """Tags that make a run traceable: cache key, data and config identity, code and versions.

    ``entry_point``: what ran (a flow's file and function); default: the command's name.
    """
    commit = git_commit(root)  # one git call for both peftflow's tag and MLflow's
    tags = {
        **source_tags(entry_point or Path(sys.argv[0]).name, commit),
        RUN_KEY_TAG: run_key,
        "peftflow.data_md5": data_md5,
        "peftflow.config_hash": config_hash,
        "peftflow.git_commit": commit,
        "peftflow.git_dirty": str(git_dirty(root)).lower(),
        "peftflow.version": peftflow.__version__,
    }
    for package in VERSIONED_PACKAGES:
        tags[f"peftflow.versions.{package}"] = _package_version(package)
    tags["peftflow.versions.python"] = platform.python_version()
    return tags


def find_finished_run(tracking_uri: str, experiment_name: str, run_key: str) -> str | None:
    """Newest FINISHED run tagged with ``run_key``: the cache that lets identical runs skip."""
    if "'" in run_key or "`" in run_key:
        raise PeftflowError(
            f"run key {run_key!r} contains a quote, which MLflow filters cannot match; "
            "run keys are hex digests, so pass the value from the config hash unchanged."
        )
    check_tracking_server(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    # A reproduction re-trains a run key to check it; it is no cache entry of its own.
    # (Filtered here: MLflow's `!=` on a tag would also drop runs that lack the tag.)
    cached = [run for run in runs if run.data.tags.get("peftflow.kind") != "reproduction"]
    return cached[0].info.run_id if cached else None


@dataclass(frozen=True)
class RunResult:
    """An MLflow run the pipeline trained or found: a fine-tuned model or a baseline.

    ``cached``: found by its run key, nothing was trained. ``model_dir``: the saved
    model folder (fine-tuned runs). ``predictions_path``: saved predictions that later
    runs compare with (a generator's zero-shot baseline).
    """

    run_id: str
    run_key: str
    metrics: dict[str, float]
    cached: bool = False
    model_dir: str | None = None
    predictions_path: str | None = None
    history: tuple[dict[str, float], ...] = ()


def finished_run(tracking_uri: str, run_id: str, run_key: str | None = None) -> RunResult:
    """The RunResult of an existing run (served from the cache: nothing retrains)."""
    run = MlflowClient(tracking_uri).get_run(run_id)
    return RunResult(
        run_id=run_id,
        run_key=run_key or run.data.tags.get(RUN_KEY_TAG, ""),
        metrics=dict(run.data.metrics),
        cached=True,
        model_dir=run.data.tags.get(MODEL_DIR_TAG),
    )


def _truncate(value: Any, limit: int) -> str:
    """``str(value)`` cut to ``limit`` characters, marked so a reader knows it was cut."""
    text = str(value)
    if len(text) <= limit:
        return text
    return text[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _as_float(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PeftflowError(
            f"metric {key!r} has non-numeric value {value!r}; log numbers as metrics "
            "and text as tags or params."
        ) from None


class RunTracker:
    """One MLflow run, written through an explicit client.

    Use as a context manager: the run ends FINISHED when the block completes
    and FAILED (with the error recorded in the ``peftflow.error`` tag) when it
    raises; the exception is always re-raised.
    """

    def __init__(self, tracking_uri: str):
        self.client = MlflowClient(tracking_uri)
        self.run_id: str | None = None
        self._open = False

    def start(
        self,
        experiment_id: str,
        run_name: str,
        tags: Mapping[str, Any],
        params: Mapping[str, Any],
        parent_run_id: str | None = None,
    ) -> str:
        """Create the run with its tags and params; return its id."""
        if self._open:
            raise PeftflowError(
                f"RunTracker already has run {self.run_id} open; finish it first "
                "or use a new RunTracker for a second run."
            )
        all_tags = {key: _truncate(value, MAX_TAG_VAL_LENGTH) for key, value in tags.items()}
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        self.run_id, self._open = run.info.run_id, True
        self.log_params(params)
        return self.run_id

    def resume(self, run_id: str, experiment_id: str) -> bool:
        """Re-open run ``run_id`` (left RUNNING by a killed process, or FAILED) to go on logging.

        Its tags, params and metrics stay; a recorded error moves to
        ``peftflow.resumed_after_error``. False, with nothing changed, when the run
        cannot be continued: not in this store and experiment, deleted, or FINISHED.
        """
        if self._open:
            raise PeftflowError(f"RunTracker already has run {self.run_id} open; finish it first.")
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        info = run.info
        if info.experiment_id != experiment_id or info.lifecycle_stage == "deleted":
            return False
        if info.status == "FINISHED":
            return False
        self.client.update_run(run_id, status="RUNNING")
        self.run_id, self._open = run_id, True
        if ERROR_TAG in run.data.tags:
            self.set_tags({f"{RESUMED_TAG}_after_error": run.data.tags[ERROR_TAG]})
            self.client.delete_tag(run_id, ERROR_TAG)
        return True

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params as strings, cut to MLflow's 6000-character limit (batched 100 at a time)."""
        run_id = self._require_open_run()
        entries = [
            Param(key, _truncate(value, MAX_PARAM_VAL_LENGTH)) for key, value in params.items()
        ]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """All ``metrics`` at ``step`` in one ``log_batch`` call (one round trip, not one a key)."""
        run_id = self._require_open_run()
        timestamp = int(time.time() * 1000)
        entries = [
            Metric(key, _as_float(key, value), timestamp, 0 if step is None else step)
            for key, value in metrics.items()
        ]
        if entries:
            self.client.log_batch(run_id, metrics=entries)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Copy a file, or a folder under its own name, into the run's artifacts."""
        path = Path(path)
        if not path.exists():
            raise PeftflowError(f"cannot log artifact {path}: it does not exist; write it first.")
        self.client.log_artifact(self._require_open_run(), str(path), artifact_path)

    def log_inputs(self, datasets: list) -> None:
        """Dataset inputs (``mlflow.entities.DatasetInput``): the run's Datasets in the UI."""
        self.client.log_inputs(self._require_open_run(), datasets=datasets)

    def log_dict(self, obj: dict, file: str) -> None:
        """Write ``obj`` as a JSON (or YAML, by extension) artifact named ``file``."""
        self.client.log_dict(self._require_open_run(), obj, file)

    def log_table(self, frame: Any, file: str) -> None:
        """A DataFrame as an MLflow table artifact (``file`` ends in .json), shown in the UI."""
        self.client.log_table(self._require_open_run(), data=frame, artifact_file=file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Add or overwrite tags (e.g. gate results the registry checks before promotion)."""
        entries = [RunTag(key, _truncate(value, MAX_TAG_VAL_LENGTH)) for key, value in tags.items()]
        run_id = self._require_open_run()
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with a terminal status (FINISHED, FAILED or KILLED)."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise PeftflowError(
                f"run status {status!r} is not terminal; use FINISHED, FAILED or KILLED."
            )
        self.client.set_terminated(self._require_open_run(), status)
        self._open = False

    def _require_open_run(self) -> str:
        if not self._open or self.run_id is None:
            raise PeftflowError("no open MLflow run: call RunTracker.start(...) first.")
        return self.run_id

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if not self._open:
            return False
        if exc is None:
            self.finish("FINISHED")
            return False
        self.set_tags({ERROR_TAG: f"{exc_type.__name__}: {exc}"})
        self.finish("FAILED")
        return False
