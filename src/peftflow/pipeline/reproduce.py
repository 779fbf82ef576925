"""Reproduce a fine-tuning run from its MLflow record: same config, same data, same metrics.

A run records enough to be re-run without its git history or today's ``data/``:

- the config: the ``peftflow_config.json`` artifact (:func:`log_config`), else one
  rebuilt from the run's flat params; either way it must hash to the run's
  ``peftflow.config_hash`` tag, so a lossy rebuild is refused instead of trained;
- the data: the ``peftflow.data_md5`` tag, a DVC folder md5 whose manifest names
  every file's md5. That version is checked out from the verified DVC cache (bad or
  missing objects come from the remote) into a scratch folder, so the user's
  ``data/`` and ``data.dvc`` keep whatever version they hold now.

The restored data goes through the flow's checks (raw-data suite, split, leakage,
tokenisation), training runs again as a new MLflow run (tags ``peftflow.kind=
reproduction``, ``peftflow.reproduces=<run id>``) and every ``test_*`` metric is
compared with the original within a tolerance.

Depends on: config, tracking.
"""

from __future__ import annotations

import ast
import json
import math
import tempfile
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run, RunTag
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from peftflow.config import METHOD_SETTINGS, ExperimentConfig, parse_config
from peftflow.errors import ConfigError, PeftflowError
from peftflow.gitinfo import git_commit
from peftflow.pipeline import definition, stages
from peftflow.pipeline.results import PipelineState, RunContext
from peftflow.tracking.runs import RunResult, check_tracking_server, resolve_tracking_uri

DATA_MD5_TAG = "peftflow.data_md5"
CONFIG_HASH_TAG = "peftflow.config_hash"
COMMIT_TAG = "peftflow.git_commit"
DIRTY_TAG = "peftflow.git_dirty"
PROCESSES_TAG = "peftflow.ddp.processes"
KIND_TAG = "peftflow.kind"
REPRODUCES_TAG = "peftflow.reproduces"
REPRODUCED_TAG = "peftflow.reproduced"
REPRODUCTION_KIND = "reproduction"
REPRODUCIBLE_KINDS = ("finetune", REPRODUCTION_KIND)
CONFIG_ARTIFACT = stages.CONFIG_ARTIFACT
REPORT_ARTIFACT = "reproduction.json"
DEFAULT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class MetricCheck:
    name: str
    original: float
    reproduced: float | None  # None: the new run did not log it

    def within(self, tolerance: float) -> bool:
        if self.reproduced is None:
            return False
        if math.isnan(self.original) or math.isnan(self.reproduced):
            return math.isnan(self.original) and math.isnan(self.reproduced)
        return abs(self.reproduced - self.original) <= tolerance


@dataclass(frozen=True)
class Reproduction:
    original_run_id: str
    run_id: str
    data_md5: str
    config_source: str  # "artifact" or "params"
    tolerance: float
    checks: tuple[MetricCheck, ...]
    original_commit: str
    commit: str
    notes: tuple[str, ...] = ()  # what may explain a difference (other code, data-parallel)

    @property
    def reproduced(self) -> bool:
        return all(check.within(self.tolerance) for check in self.checks)

    def table(self) -> str:
        """The comparison as a plain-text table with a one-line verdict."""
        lines = [
            f"run {self.original_run_id} -> {self.run_id} (tag {REPRODUCES_TAG})",
            f"data {self.data_md5} from DVC; config from the run's {self.config_source}; "
            f"code {self.original_commit[:12]} -> {self.commit[:12]}",
            f"{'metric':<24} {'original':>12} {'reproduced':>12} {'difference':>12}",
        ]
        for check in self.checks:
            new = "missing" if check.reproduced is None else f"{check.reproduced:.6f}"
            diff = "-" if check.reproduced is None else f"{check.reproduced - check.original:+.2e}"
            mark = "" if check.within(self.tolerance) else "  <-- differs"
            lines.append(f"{check.name:<24} {check.original:>12.6f} {new:>12} {diff:>12}{mark}")
        lines += [f"note: {note}" for note in self.notes]
        verdict = "REPRODUCED" if self.reproduced else "NOT REPRODUCED"
        lines.append(f"{verdict}: test metrics compared within {self.tolerance:g}")
        return "\n".join(lines)


def reproduce(
    run_id: str,
    root: Path,
    tolerance: float = DEFAULT_TOLERANCE,
    tracking_uri: str | None = None,
) -> Reproduction:
    """Re-train ``run_id`` with its config on its data version; compare its test metrics."""
    root = Path(root).resolve()
    uri = resolve_tracking_uri(tracking_uri, root)
    _require_store(uri)
    client = MlflowClient(uri)
    original = load_run(client, run_id, uri)
    cfg, source = run_config(client, original)
    _require_same_store(cfg, root, uri, run_id)
    md5 = original.data.tags[DATA_MD5_TAG]
    result = _rerun(cfg, md5, root, run_id, _had_baseline(original))
    outcome = Reproduction(
        original_run_id=run_id,
        run_id=result.run_id,
        data_md5=md5,
        config_source=source,
        tolerance=tolerance,
        checks=compare_metrics(original.data.metrics, result.metrics),
        original_commit=original.data.tags.get(COMMIT_TAG, "unknown"),
        commit=git_commit(root),
        notes=_notes(original, root, cfg.train.devices),
    )
    _record(client, outcome)
    return outcome


def _require_store(uri: str) -> None:
    """Fail fast on a stopped server or a missing sqlite file (MLflow would create an empty one)."""
    check_tracking_server(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise PeftflowError(
            f"there is no MLflow store at {uri}: nothing was tracked there; pass the project "
            "folder the run was trained in (--root) or its store (--tracking-uri)"
        )


def load_run(client: MlflowClient, run_id: str, uri: str) -> Run:
    """The run, refused unless it is a finished fine-tuning run with its identity tags."""
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise PeftflowError(
            f"no MLflow run {run_id!r} in {uri} ({err.message}); check the id (`peftflow "
            "compare -e EXPERIMENT` or `peftflow ui` list runs) and --root/--tracking-uri"
        ) from None
    tags = run.data.tags
    missing = [tag for tag in (KIND_TAG, DATA_MD5_TAG, CONFIG_HASH_TAG) if tag not in tags]
    if missing:
        raise PeftflowError(
            f"run {run_id} has no tag {', '.join(missing)}: it was not logged by peftflow's "
            "training stage, so its config and data version are unknown; reproduce a run "
            "trained by `peftflow run` (tag peftflow.kind=finetune)"
        )
    if tags[KIND_TAG] not in REPRODUCIBLE_KINDS:
        raise PeftflowError(
            f"run {run_id} is a {tags[KIND_TAG]!r} run, not a fine-tuning run; reproduce a "
            "run trained by `peftflow run` (tag peftflow.kind=finetune)"
        )
    if run.info.status != "FINISHED" or not _test_metrics(run.data.metrics):
        raise PeftflowError(
            f"run {run_id} is {run.info.status} without test metrics: nothing to compare; "
            "reproduce a FINISHED run"
        )
    return run


def run_config(client: MlflowClient, run: Run) -> tuple[ExperimentConfig, str]:
    """The run's exact config (from its artifact, else its params) and where it came from."""
    run_id, expected = run.info.run_id, run.data.tags[CONFIG_HASH_TAG]
    logged = _config_artifact(client, run_id)
    source = "params" if logged is None else "artifact"
    data = config_from_params(run.data.params) if logged is None else logged
    commit = run.data.tags.get(COMMIT_TAG, "unknown")
    try:
        cfg = parse_config(data, source=f"run {run_id} ({source})")
    except ConfigError as err:
        raise ConfigError(
            f"{err}\nThis peftflow no longer accepts the run's config; reproduce it from the "
            f"code it ran with (`git checkout {commit}`)"
        ) from None
    if cfg.config_hash() != expected:
        raise ConfigError(
            f"the config rebuilt from run {run_id}'s {source} hashes to {cfg.config_hash()}, "
            f"not to the run's {expected}: a value was cut or changed meaning, and training it "
            f"would not reproduce the run; try the code it ran with (`git checkout {commit}`)"
        )
    return cfg, source


def config_from_params(params: Mapping[str, str]) -> dict:
    """Nested config data from ``ExperimentConfig.flat_params()`` strings (other params ignored).

    The ``method`` section holds the settings of the method the params name.
    """
    method = METHOD_SETTINGS.get(params.get("method.name", ""))
    leaves = {
        **_leaf_fields(ExperimentConfig),
        **(_leaf_fields(method, "method.") if method else {}),
    }
    tree: dict[str, Any] = {}
    for key, annotation in leaves.items():
        if key not in params:
            continue  # a field added after the run: its default applies, the hash decides
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _parse_param(params[key], annotation)
    return tree


def compare_metrics(
    original: Mapping[str, float], reproduced: Mapping[str, float]
) -> tuple[MetricCheck, ...]:
    """One check per ``test_*`` metric of the original run."""
    return tuple(
        MetricCheck(name, original[name], reproduced.get(name)) for name in _test_metrics(original)
    )


def _test_metrics(metrics: Mapping[str, float]) -> list[str]:
    return sorted(name for name in metrics if name.startswith("test_"))


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Dotted name -> annotation of every leaf field, as ``flat_params`` names them.

    A union of sections (``method``) is not walked here: it depends on the value.
    """
    fields: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields.update(_leaf_fields(annotation, f"{prefix}{name}."))
        elif not _is_model_union(annotation):
            fields[f"{prefix}{name}"] = annotation
    return fields


def _is_model_union(annotation: Any) -> bool:
    options = typing.get_args(annotation)
    return bool(options) and all(isinstance(o, type) and issubclass(o, BaseModel) for o in options)


def _parse_param(text: str, annotation: Any) -> Any:
    """Undo ``str(value)``: str fields stay text ("123" is a name), others are literals."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if union else (annotation,)
    if str in options:  # str or str | None
        return None if text == "None" and type(None) in options else text
    try:
        return ast.literal_eval(text)  # None, True, 5e-05, ['ham', 'spam'] ...
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text  # a plain string (a Literal choice, a path)


def _config_artifact(client: MlflowClient, run_id: str) -> dict | None:
    if CONFIG_ARTIFACT not in {item.path for item in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(run_id, CONFIG_ARTIFACT, folder)
        return json.loads(Path(path).read_text())


def _require_same_store(cfg: ExperimentConfig, root: Path, uri: str, run_id: str) -> None:
    """The reproduction must land next to the run it reproduces, where the tags point."""
    target = stages.tracking_uri(cfg, root)
    if target != uri:
        raise PeftflowError(
            f"run {run_id} is in {uri}, but its config would log the reproduction to {target}; "
            f"export MLFLOW_TRACKING_URI={uri} (instead of --tracking-uri) or run from the "
            "project folder the run was trained in (--root)"
        )


def _notes(run: Run, root: Path, devices: int) -> tuple[str, ...]:
    """Known reasons for small differences, shown with the verdict."""
    tags, notes = run.data.tags, []
    if tags.get(COMMIT_TAG, "unknown") != git_commit(root) or tags.get(DIRTY_TAG) == "true":
        notes.append("the code differs from the run's commit (or the run's tree was dirty)")
    trained_on = int(tags.get(PROCESSES_TAG, "1"))
    if trained_on != devices:
        notes.append(
            f"the run trained data-parallel on {trained_on} process(es), this one on {devices}: "
            "float sums differ, so allow a --tolerance"
        )
    return tuple(notes)


def _had_baseline(run: Run) -> bool:
    """A generation run logged its gain over the zero-shot baseline: the rerun needs it too."""
    return any(name.startswith("zero_shot_") for name in run.data.metrics)


def _rerun(
    cfg: ExperimentConfig, md5: str, root: Path, original_id: str, baseline: bool
) -> RunResult:
    """The pipeline with the ingest replaced by a checkout of data version ``md5`` into a
    scratch folder, and no cache, registration or promotion. The user's ``data/`` and
    ``data.dvc`` keep whatever version they hold now."""
    work = stages.outputs_dir(root) / "reproduce" / original_id
    work.mkdir(parents=True, exist_ok=True)
    tags = {KIND_TAG: REPRODUCTION_KIND, REPRODUCES_TAG: original_id}
    ctx = RunContext(cfg, root, extra_tags=tags)
    with tempfile.TemporaryDirectory(dir=work, prefix="data-") as scratch:
        pipeline = definition.finetune_pipeline(cfg, baseline=baseline, force=True)
        pipeline = definition.on_data_version(
            pipeline, md5, Path(scratch) / "data", f"run {original_id}"
        ).without("register-model", "promote-model")
        state = definition.run(pipeline, ctx, PipelineState())
    return state.trained


def _record(client: MlflowClient, outcome: Reproduction) -> None:
    """Tag the new run as a reproduction (so compare does not rank it twice), with its verdict."""
    tags = {
        KIND_TAG: REPRODUCTION_KIND,
        REPRODUCES_TAG: outcome.original_run_id,
        REPRODUCED_TAG: str(outcome.reproduced).lower(),
    }
    client.log_batch(outcome.run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    report = {
        "original_run_id": outcome.original_run_id,
        "reproduced": outcome.reproduced,
        "tolerance": outcome.tolerance,
        "metrics": {c.name: [c.original, c.reproduced] for c in outcome.checks},
    }
    client.log_dict(outcome.run_id, report, REPORT_ARTIFACT)
