"""The scheduled refresh: re-ingest, and retrain the configured variants only when the data changed.

Where the state lives: a FINISHED MLflow run of kind ``refresh`` in the first config's
experiment, tagged with the data md5 it processed and a refresh key (a hash of the
configs' hashes). It is read back with one ``search_runs`` call. Chosen over a JSON file
under ``outputs/`` because the tracking store is the one place every worker (a GPU host,
a Kubernetes pod with an ephemeral disk) and every user already share: the UI shows each
refresh next to the runs it trained, with its decision and per-variant summary, and the
run-key cache the refresh relies on lives in the same store, so state and cache cannot
drift apart between machines. A refresh where a variant failed is logged as a FAILED run
(visible, with the error) and is ignored by the lookup: the new md5 is only recorded once
every variant succeeded, so the next scheduled refresh tries again (already-trained run
keys are then served from cache).

Nothing here imports Prefect: ``flows/refresh.py`` passes the ingest and the per-variant
training (finetune subflows) in as callables.

Depends on: config, tracking, task.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from peftflow.config import ExperimentConfig, load_config
from peftflow.errors import ConfigError, PeftflowError
from peftflow.pipeline.results import Ingested, PipelineState
from peftflow.task.preflight import preflight
from peftflow.task.registry import task_for
from peftflow.tracking.runs import (
    ERROR_TAG,
    RunTracker,
    ensure_experiment,
    resolve_tracking_uri,
    standard_tags,
)

KIND_TAG = "peftflow.kind"
REFRESH_KIND = "refresh"
REFRESH_KEY_TAG = "peftflow.refresh_key"
DATA_MD5_TAG = "peftflow.data_md5"
CONFIG_HASHES_TAG = "peftflow.config_hashes"
SUMMARY_FILE = "refresh_summary.json"
# The DataConfig fields that decide what ingestion writes (split and check bounds do not).
INGEST_FIELDS = (
    "source",
    "path",
    "url",
    "text_column",
    "label_column",
    "prompt_column",
    "response_column",
    "data_dir",
)


class RefreshError(PeftflowError):
    """At least one variant failed; the state was not advanced. ``summary`` has the details."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class RefreshPlan:
    """The configs of one refresh, validated, and where its state is kept."""

    config_paths: tuple[str, ...]
    configs: tuple[ExperimentConfig, ...]
    key: str
    tracking_uri: str
    experiment: str

    @property
    def reference(self) -> ExperimentConfig:
        """The config whose data section drives the ingest (all share it)."""
        return self.configs[0]


@dataclass(frozen=True)
class RefreshDecision:
    changed: bool
    reason: str
    data_md5: str
    previous_md5: str | None = None
    previous_run_id: str | None = None
    forced: bool = False


@dataclass
class VariantOutcome:
    config: str
    name: str
    status: str  # trained | cached | failed
    run_id: str | None = None
    run_key: str | None = None
    data_md5: str | None = None
    registered_version: str | None = None
    promotion: dict | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def ingest_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """What ingestion writes depends on: the source fields and, for tables, the task's layout."""
    identity = {name: getattr(cfg.data, name) for name in INGEST_FIELDS}
    identity["layout"] = task_for(cfg).table_layout if cfg.data.source == "table" else "labelled"
    return identity


def refresh_key(configs: Sequence[ExperimentConfig]) -> str:
    """16 hex chars over the sorted config hashes: the same set of variants, the same key."""
    hashes = sorted(cfg.config_hash() for cfg in configs)
    return hashlib.sha256(",".join(hashes).encode()).hexdigest()[:16]


def plan_refresh(config_paths: Sequence[str], root: Path) -> RefreshPlan:
    """Load and check every config before any work: one data version must serve them all."""
    paths = [str(path) for path in config_paths]
    if not paths:
        raise ConfigError("refresh needs at least one experiment config in config_paths")
    duplicates = sorted({path for path in paths if paths.count(path) > 1})
    if duplicates:
        raise ConfigError(f"config_paths lists {', '.join(duplicates)} more than once")
    configs = [load_config(path) for path in paths]
    reference = configs[0]
    expected = ingest_identity(reference)
    for path, cfg in zip(paths[1:], configs[1:], strict=True):
        identity = ingest_identity(cfg)
        if identity != expected:
            differing = sorted(k for k in expected if identity[k] != expected[k])
            raise ConfigError(
                f"{path} reads other data than {paths[0]} (differs in {', '.join(differing)}); "
                "a refresh ingests one data version, so give its configs the same data source "
                "or schedule one refresh per source"
            )
    for cfg in configs:  # model, method and machine checks: refuse before any work
        preflight(cfg)
    return RefreshPlan(
        config_paths=tuple(paths),
        configs=tuple(configs),
        key=refresh_key(configs),
        tracking_uri=resolve_tracking_uri(reference.tracking.tracking_uri, Path(root)),
        experiment=reference.tracking.experiment,
    )


def last_refresh(plan: RefreshPlan) -> dict[str, str] | None:
    """The newest successful refresh of these configs: its run id and the md5 it processed."""
    client = MlflowClient(plan.tracking_uri)
    experiment = client.get_experiment_by_name(plan.experiment)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"tags.`{KIND_TAG}` = '{REFRESH_KIND}' and tags.`{REFRESH_KEY_TAG}` = '{plan.key}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    return {"run_id": runs[0].info.run_id, "data_md5": runs[0].data.tags.get(DATA_MD5_TAG, "")}


def decide(plan: RefreshPlan, data_md5: str, force: bool = False) -> RefreshDecision:
    """Retrain when the md5 differs from the last successful refresh's (or there is none)."""
    previous = last_refresh(plan)
    before = {
        "previous_md5": previous["data_md5"] if previous else None,
        "previous_run_id": previous["run_id"] if previous else None,
    }
    if previous is None:
        reason = f"no earlier refresh of these configs: training on data md5 {data_md5}"
        return RefreshDecision(True, reason, data_md5, **before)
    if previous["data_md5"] != data_md5:
        reason = f"data changed (md5 {previous['data_md5']} -> {data_md5}): training"
        return RefreshDecision(True, reason, data_md5, **before)
    if force:
        reason = f"data unchanged (md5 {data_md5}) but force=True: re-running every variant"
        return RefreshDecision(True, reason, data_md5, forced=True, **before)
    reason = f"data unchanged (md5 {data_md5}): nothing to train"
    return RefreshDecision(False, reason, data_md5, **before)


def variant_outcome(
    config_path: str, cfg: ExperimentConfig, state: PipelineState
) -> VariantOutcome:
    """The finetune pipeline's results, reduced to what a refresh reports per variant."""
    trained, registered = state.trained, state.registered
    return VariantOutcome(
        config=config_path,
        name=cfg.name,
        status="cached" if trained.cached else "trained",
        run_id=trained.run_id,
        run_key=trained.run_key,
        data_md5=state.data_md5,
        registered_version=registered.version if registered else None,
        promotion=asdict(state.promotion) if state.promotion else None,
        metrics={k: v for k, v in trained.metrics.items() if k.startswith("test_")},
    )


def failed_outcome(config_path: str, cfg: ExperimentConfig, error: BaseException) -> VariantOutcome:
    return VariantOutcome(
        config=config_path, name=cfg.name, status="failed", error=f"{type(error).__name__}: {error}"
    )


def record_refresh(
    plan: RefreshPlan,
    decision: RefreshDecision,
    outcomes: Sequence[VariantOutcome],
    root: Path,
) -> tuple[str, bool]:
    """Log the refresh as an MLflow run; FINISHED (state advanced) only when every variant did.

    A variant that reports another md5 than the refresh ingested (the source changed while
    the refresh ran) also keeps the state where it was: the next refresh looks again.
    Returns the run id and whether the new md5 was recorded.
    """
    problem = _unrecordable(decision, outcomes)
    experiment_id = ensure_experiment(plan.experiment, plan.tracking_uri, Path(root))
    params = {f"config.{i}": path for i, path in enumerate(plan.config_paths)}
    counts = {
        f"variants_{status}": sum(o.status == status for o in outcomes)
        for status in ("trained", "cached", "failed")
    }
    tracker = RunTracker(plan.tracking_uri)
    name = f"refresh-{decision.data_md5[:8]}"
    run_id = tracker.start(experiment_id, name, _refresh_tags(plan, decision, root), params)
    tracker.log_metrics(counts)
    variants = [asdict(outcome) for outcome in outcomes]
    tracker.log_dict({"decision": asdict(decision), "variants": variants}, SUMMARY_FILE)
    if problem:
        tracker.set_tags({ERROR_TAG: problem})
    tracker.finish("FAILED" if problem else "FINISHED")
    return run_id, problem is None


def _unrecordable(decision: RefreshDecision, outcomes: Sequence[VariantOutcome]) -> str | None:
    """Why the refresh's md5 must not be recorded as processed, or None."""
    failed = [o.name for o in outcomes if o.status == "failed"]
    if failed:
        return f"failed variants: {', '.join(failed)}"
    drifted = [o.name for o in outcomes if o.data_md5 != decision.data_md5]
    if drifted:
        return f"variants trained on another data md5: {', '.join(drifted)}"
    return None


def _refresh_tags(plan: RefreshPlan, decision: RefreshDecision, root: Path) -> dict[str, str]:
    key = f"refresh-{plan.key}-{decision.data_md5}"
    return {
        **standard_tags(key, decision.data_md5, plan.key, Path(root)),
        KIND_TAG: REFRESH_KIND,
        REFRESH_KEY_TAG: plan.key,
        CONFIG_HASHES_TAG: ",".join(sorted(cfg.config_hash() for cfg in plan.configs)),
        "peftflow.refresh_reason": decision.reason,
        "peftflow.previous_data_md5": decision.previous_md5 or "none",
    }


def run_refresh(
    plan: RefreshPlan,
    root: Path,
    ingest: Callable[[], Ingested],
    train_variant: Callable[[str, Ingested], PipelineState],
    force: bool = False,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> dict:
    """Ingest; if the md5 is new (or ``force``), train every variant, then record the state.

    ``ingest`` returns the data version it ingested; ``train_variant(path, ingested)`` runs
    the finetune pipeline for one config path on that data (all configs share it, so it is
    ingested once) and returns its results (an unchanged run key is served from cache
    there). One failing variant does not stop the others; it keeps the state unchanged and
    raises :class:`RefreshError` at the end.
    """
    logger = logger or logging.getLogger(__name__)
    ingested = ingest()
    decision = decide(plan, ingested.data_md5, force)
    logger.info(decision.reason)
    summary = _summary(plan, decision)
    if not decision.changed:
        return {**summary, "refresh_run_id": decision.previous_run_id, "variants": []}
    outcomes = [
        _train_one(path, cfg, ingested, train_variant, logger)
        for path, cfg in zip(plan.config_paths, plan.configs, strict=True)
    ]
    run_id, recorded = record_refresh(plan, decision, outcomes, root)
    summary.update(
        refresh_run_id=run_id,
        state_recorded=recorded,
        variants=[asdict(outcome) for outcome in outcomes],
    )
    if recorded:
        logger.info("data md5 %s recorded as refreshed (MLflow run %s)", ingested.data_md5, run_id)
    failed = [o.name for o in outcomes if o.status == "failed"]
    if failed:
        raise RefreshError(
            f"refresh of data md5 {ingested.data_md5}: {len(failed)} of {len(outcomes)} "
            f"variants failed ({', '.join(failed)}); the state was not advanced, so the next "
            f"refresh retries (see MLflow run {run_id})",
            summary,
        )
    return summary


def _summary(plan: RefreshPlan, decision: RefreshDecision) -> dict[str, Any]:
    return {
        "data_md5": decision.data_md5,
        "previous_md5": decision.previous_md5,
        "changed": decision.previous_md5 != decision.data_md5,
        "forced": decision.forced,
        "trained": decision.changed,
        "message": decision.reason,
        "refresh_key": plan.key,
        "configs": list(plan.config_paths),
    }


def _train_one(path: str, cfg, ingested, train_variant, logger) -> VariantOutcome:
    """One variant's outcome; its failure is recorded, never raised (the others still run)."""
    try:
        outcome = variant_outcome(path, cfg, train_variant(path, ingested))
    except Exception as error:  # one variant's failure must not stop the others
        name = type(error).__name__
        logger.error("variant %s (%s) failed: %s: %s", cfg.name, path, name, error)
        return failed_outcome(path, cfg, error)
    logger.info(describe(outcome))
    return outcome


def describe(outcome: VariantOutcome) -> str:
    """One log line per variant: what happened, which run, which version, the gate's decision."""
    text = f"variant {outcome.name}: {outcome.status} (run {outcome.run_id})"
    if outcome.registered_version:
        text += f", registered v{outcome.registered_version}"
    if outcome.promotion:
        verdict = "promoted" if outcome.promotion.get("promoted") else "not promoted"
        text += f", {verdict}: {outcome.promotion.get('reason', '')}"
    return text
