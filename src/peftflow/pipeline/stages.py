"""The pipeline's stages as plain functions of (context, results so far) -> a typed result.

Each stage takes the :class:`~peftflow.pipeline.results.RunContext` and the
:class:`~peftflow.pipeline.results.PipelineState` and returns what fills its slot;
torch objects never cross a stage boundary (results are paths, metrics and ids), so
an orchestrator can retry, cache and persist them. The order the stages run in is
declared once, in :mod:`peftflow.pipeline.definition`; what differs between
classification and generation is the task's (:mod:`peftflow.task`).

Depends on: config, data, models, training, tracking, task, serving.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
from pathlib import Path

import pandas as pd
from mlflow.models import infer_signature

import peftflow
from peftflow.config import ExperimentConfig
from peftflow.data.dvc_integrity import checkout_version
from peftflow.data.dvc_repo import version_location
from peftflow.data.ingest import TABLE_NAME
from peftflow.data.ingest import ingest as ingest_data
from peftflow.data.split import SPLITS
from peftflow.errors import DataError
from peftflow.models.facts import ModelFacts
from peftflow.pipeline.gate import evidence_for
from peftflow.pipeline.results import (
    CheckOutcome,
    Ingested,
    PipelineState,
    RunContext,
    SplitResult,
)
from peftflow.serving.pyfunc import ENTRY_POINT, PeftflowModel
from peftflow.serving.runtime import (
    flavor_info,
    folder_to_log,
    runtime_requirements,
    stage_runtime,
)
from peftflow.task.preflight import preflight as check_before_any_work
from peftflow.task.registry import load_trained, task_for
from peftflow.task.run import epoch_logger, train_and_evaluate
from peftflow.tracking.lineage import split_inputs
from peftflow.tracking.promotion import GATE_TAGS, PromotionDecision, promote_if_better
from peftflow.tracking.registration import (
    ModelVersionInfo,
    assert_same_predictions,
    log_and_register_model,
)
from peftflow.tracking.runs import (
    MODEL_DIR_TAG,
    RESUMED_TAG,
    RunResult,
    RunTracker,
    ensure_experiment,
    find_finished_run,
    finished_run,
    resolve_tracking_uri,
    standard_tags,
)
from peftflow.training.checkpoint import Checkpoints, claimed

logger = logging.getLogger("peftflow.pipeline")
CONFIG_ARTIFACT = "peftflow_config.json"


# --- where things go ----------------------------------------------------------------------------


def outputs_dir(root: Path) -> Path:
    return Path(root) / "outputs"


def tracking_uri(cfg: ExperimentConfig, root: Path) -> str:
    return resolve_tracking_uri(cfg.tracking.tracking_uri, Path(root))


def check_reports_dir(ctx: RunContext, data_version: str) -> Path:
    """Where the data checks of one pipeline run on one data version write their reports."""
    return outputs_dir(ctx.root) / "reports" / f"{ctx.reports_name or ctx.cfg.name}-{data_version}"


def split_dir(cfg: ExperimentConfig, data_md5: str, root: Path) -> Path:
    """Where the split of one data version, split config and seed is written."""
    key = f"{cfg.task}-{data_md5}-{cfg.data.split.model_dump_json()}-{cfg.seed}"
    return outputs_dir(root) / "splits" / _short_hash(key)


def split_cache_key(cfg: ExperimentConfig, data_md5: str, root: Path) -> str:
    """A result-cache key for the split stage: a pure function of (data version, split
    config, seed, project folder, code), so an orchestrator may persist its result."""
    folder = split_dir(cfg, data_md5, Path(root).resolve())
    return f"split-{_short_hash(f'{folder}-{peftflow.__version__}')}"


def split_written(cfg: ExperimentConfig, data_md5: str, root: Path) -> bool:
    """Whether the split's three files exist (a persisted result naming them is valid)."""
    folder = split_dir(cfg, data_md5, Path(root).resolve())
    return all((folder / f"{name}.parquet").is_file() for name in SPLITS)


def load_splits(split_paths) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(path) for name, path in split_paths.items()}


def log_data_inputs(tracker, ctx: RunContext, state: PipelineState, splits) -> None:
    """The splits as the run's MLflow datasets: ``<data>-<split>-<split id>`` (the split
    folder's name under outputs/splits/), digest = the DVC md5, source = the version's
    object in the DVC remote (else the data folder, where no remote is set)."""
    cfg, md5 = ctx.cfg, state.data_md5
    source = version_location(ctx.root, md5) or (ctx.root / cfg.data.data_dir).resolve().as_uri()
    data = Path(cfg.data.path).stem if cfg.data.path else cfg.data.source
    split_id = split_dir(cfg, md5, ctx.root).name[:8]
    tracker.log_inputs(split_inputs(data, md5, source, splits, split_id))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _write_report(report, report_dir: Path) -> tuple[str, ...]:
    return tuple(str(path) for path in report.write(Path(report_dir)))


# --- before any work ----------------------------------------------------------------------------


def preflight(ctx: RunContext, state: PipelineState) -> ModelFacts:
    """Model, method and machine checks from config.json alone: refuse before any work."""
    return check_before_any_work(ctx.cfg)


# --- data ---------------------------------------------------------------------------------------


def ingest(ctx: RunContext, state: PipelineState) -> tuple[Ingested, CheckOutcome]:
    """Fetch/parse the source, gate it on the raw-data suite, then DVC-track it.

    The raw-data suite runs on the new table *before* it replaces the tracked data:
    a table that fails leaves ``data/`` and ``data.dvc`` as they were, with its report
    under ``outputs/reports/<name>-rejected/``. Returns the data version and the
    passed check (which fills the raw-check slot: it is not run twice).
    """
    task, passed = task_for(ctx.cfg), []

    def gate(table: pd.DataFrame) -> None:
        report = task.raw_report(task.view(table), ctx.cfg.data)
        if not report.success:
            rejected = check_reports_dir(ctx, "rejected")
            _write_report(report, rejected)
            report.raise_if_failed(f"nothing was ingested; the report is in {rejected}")
        passed.append(report)

    result = ingest_data(
        ctx.cfg.data, ctx.root, remote_url=ctx.remote_url, layout=task.table_layout, accept=gate
    )
    ingested = Ingested(
        data_md5=result.data_md5,
        table_path=str(result.table_path),
        n_rows=result.n_rows,
        label_counts=result.label_counts,
        source=result.source,
    )
    paths = _write_report(passed[0], check_reports_dir(ctx, result.data_md5))
    return ingested, CheckOutcome(passed[0].suite, paths)


def checkout_data(
    ctx: RunContext, state: PipelineState, md5: str, dest: str, purpose: str
) -> Ingested:
    """Data version ``md5`` from the verified DVC cache, else the remote, into the new ``dest``.

    Where the data was ingested elsewhere (a study's variant on a worker, a reproduction),
    this replaces the ingest. A version the remote lacks fails here, before any training,
    with ``purpose`` and the md5 in the message.
    """
    try:
        folder = checkout_version(ctx.root, md5, Path(dest))
    except DataError as err:
        raise DataError(f"cannot restore data {md5} for {purpose}: {err}") from None
    return Ingested(md5, str(folder / TABLE_NAME), 0, {}, "dvc-checkout")


def validate_raw(ctx: RunContext, state: PipelineState) -> CheckOutcome:
    """The raw-data suite on a version ingested elsewhere (another config's bounds gated it)."""
    task = task_for(ctx.cfg)
    report = task.raw_report(task.view(pd.read_parquet(state.ingested.table_path)), ctx.cfg.data)
    paths = _write_report(report, check_reports_dir(ctx, state.data_md5))
    report.raise_if_failed()
    return CheckOutcome(report.suite, paths)


def split(ctx: RunContext, state: PipelineState) -> SplitResult:
    """Deterministic split (de-duplicated, seeded), written as parquet under outputs/splits/."""
    task = task_for(ctx.cfg)
    splits = task.split(task.view(pd.read_parquet(state.ingested.table_path)), ctx.cfg)
    out = split_dir(ctx.cfg, state.data_md5, ctx.root)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in SPLITS:
        paths[name] = str(out / f"{name}.parquet")
        splits[name].to_parquet(paths[name], index=False)
    return SplitResult(paths, task.split_summary(splits))


def validate_splits(ctx: RunContext, state: PipelineState) -> CheckOutcome:
    """The task's leakage suite over the three splits."""
    report = task_for(ctx.cfg).split_report(load_splits(state.split.paths))
    paths = _write_report(report, check_reports_dir(ctx, state.data_md5))
    report.raise_if_failed()
    return CheckOutcome(report.suite, paths)


def check_tokenisation(ctx: RunContext, state: PipelineState) -> CheckOutcome:
    """The task's tokenisation suite (token lengths vs max_length, truncation, pad, template)."""
    report, observed = task_for(ctx.cfg).tokenisation_report(
        ctx.cfg, load_splits(state.split.paths)
    )
    paths = _write_report(report, check_reports_dir(ctx, state.data_md5))
    report.raise_if_failed()
    return CheckOutcome(report.suite, paths, observed)


# --- baseline and cache -------------------------------------------------------------------------


def baseline(ctx: RunContext, state: PipelineState) -> RunResult:
    """The task's baseline on the same split, as its own MLflow run (cached by its own key).

    classification: TF-IDF + logistic regression; generation: the untouched base model.
    """
    cfg, task = ctx.cfg, task_for(ctx.cfg)
    uri = tracking_uri(cfg, ctx.root)
    experiment_id = ensure_experiment(cfg.tracking.experiment, uri, ctx.root)
    key = task.baseline_key(cfg, state.data_md5)
    existing = find_finished_run(uri, cfg.tracking.experiment, key)
    if existing:
        out_dir = outputs_dir(ctx.root) / "runs" / existing
        cached = finished_run(uri, existing, key)
        return dataclasses.replace(cached, predictions_path=task.baseline_predictions(out_dir))
    tags = {
        # its key stands in for a config hash
        **standard_tags(key, state.data_md5, key, ctx.root, ctx.entry_point),
        "peftflow.kind": "baseline",
        "peftflow.task": cfg.task,
        **task.baseline_tags(cfg),
    }
    with RunTracker(uri) as tracker:
        run_id = tracker.start(
            experiment_id,
            task.baseline_run_name,
            tags,
            task.baseline_params(cfg),
            parent_run_id=ctx.parent_run_id,
        )
        out_dir = outputs_dir(ctx.root) / "runs" / run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        splits = load_splits(state.split.paths)
        log_data_inputs(tracker, ctx, state, splits)
        metrics = task.run_baseline(cfg, splits, tracker, out_dir)
        tracker.log_metrics(metrics)
    return RunResult(run_id, key, metrics, predictions_path=task.baseline_predictions(out_dir))


def find_cached_run(ctx: RunContext, state: PipelineState) -> RunResult | None:
    """A finished run with the same run key, if any: then nothing trains."""
    cfg = ctx.cfg
    uri = tracking_uri(cfg, ctx.root)
    ensure_experiment(cfg.tracking.experiment, uri, ctx.root)
    run_key = cfg.run_key(state.data_md5)
    run_id = find_finished_run(uri, cfg.tracking.experiment, run_key)
    if run_id is None:
        return None
    logger.info("run key %s already trained as run %s: nothing to train", run_key, run_id)
    return finished_run(uri, run_id, run_key)


# --- training -----------------------------------------------------------------------------------


def train(ctx: RunContext, state: PipelineState) -> RunResult:
    """Train + evaluate inside one MLflow run; save the model folder and check it reloads.

    The exact config is logged as JSON (``peftflow reproduce`` rebuilds it from there),
    and every data check's report with it. Training writes checkpoints under
    outputs/checkpoints/<run key>/: a run whose process was killed resumes from there
    when the same run key is trained again, in the same MLflow run (see ``_open_run``);
    they are deleted once the run has succeeded.
    """
    cfg = ctx.cfg
    uri = tracking_uri(cfg, ctx.root)
    experiment_id = ensure_experiment(cfg.tracking.experiment, uri, ctx.root)
    run_key = cfg.run_key(state.data_md5)
    with claimed(checkpoints_of(ctx, run_key)) as checkpoints, RunTracker(uri) as tracker:
        run_id = _open_run(tracker, ctx, experiment_id, _run_tags(ctx, state), checkpoints)
        tracker.log_dict(cfg.model_dump(mode="json"), CONFIG_ARTIFACT)
        for path in state.report_paths:
            tracker.log_artifact(path, "data_checks")
        out_dir = outputs_dir(ctx.root) / "runs" / run_id
        splits = load_splits(state.split.paths)
        log_data_inputs(tracker, ctx, state, splits)
        trained = train_and_evaluate(
            task_for(cfg),
            cfg,
            splits,
            tracker,
            out_dir,
            checkpoints,
            state.baseline,
        )
        tracker.set_tags({MODEL_DIR_TAG: trained.model_dir, "peftflow.checks_passed": "true"})
        if checkpoints:  # the run succeeded: nothing is left to resume
            checkpoints.discard()
    history = tuple(trained.history)
    return RunResult(run_id, run_key, trained.metrics, False, trained.model_dir, history=history)


def _run_tags(ctx: RunContext, state: PipelineState) -> dict[str, str]:
    cfg = ctx.cfg
    return {
        **standard_tags(
            cfg.run_key(state.data_md5),
            state.data_md5,
            cfg.config_hash(),
            ctx.root,
            ctx.entry_point,
        ),
        "peftflow.kind": "finetune",
        "peftflow.method": cfg.method.name,
        "peftflow.task": cfg.task,
        "peftflow.base_model": cfg.model.name,
        **ctx.extra_tags,
    }


def checkpoints_of(ctx: RunContext, run_key: str) -> Checkpoints | None:
    """The run key's checkpoints; None with train.checkpoint_every_steps 0.

    In a data-parallel launch this runs on rank 0, which writes them for every rank.
    """
    if not ctx.cfg.train.checkpoint_every_steps:
        return None
    return Checkpoints(outputs_dir(ctx.root) / "checkpoints" / run_key, run_key)


def _open_run(tracker, ctx: RunContext, experiment_id, tags, checkpoints) -> str:
    """Start the run, or continue the one a killed process left (its checkpoint names it).

    When that run cannot be continued (another tracking store, deleted, finished), a
    new run starts with the epochs done so far logged again. Either way the run is
    tagged ``peftflow.resumed_from`` = "epoch E step S".
    """
    cfg = ctx.cfg
    pending = checkpoints.pending() if checkpoints else None
    if pending and pending.run_id and tracker.resume(pending.run_id, experiment_id):
        run_id = pending.run_id
    else:
        params = cfg.flat_params()
        run_id = tracker.start(
            experiment_id, cfg.name, tags, params, parent_run_id=ctx.parent_run_id
        )
        for metrics in pending.history if pending else []:
            epoch_logger(tracker)(int(metrics["epoch"]), metrics)
    if pending:
        tracker.set_tags({RESUMED_TAG: pending.position})
        logger.info("run %s resumes from %s (%s)", run_id, pending.position, pending.folder)
    if checkpoints:
        checkpoints.run_id = run_id
    return run_id


# --- registry -----------------------------------------------------------------------------------


def register(ctx: RunContext, state: PipelineState) -> ModelVersionInfo:
    """Log the pyfunc model into the run, check the logged copy, register a new version.

    The model is logged in ``tracking.model_format`` (the adapter as trained, or merged
    into one full model) with the serving runtime as its code, so it serves where
    peftflow is not installed. The check reloads the model from the store and requires
    the outputs of the trained folder on the input example and the first test rows:
    probabilities within float noise, generated text identical.
    """
    task, trained = task_for(ctx.cfg), state.trained
    example = pd.DataFrame({"text": [task.input_example]})
    test = pd.read_parquet(state.split.paths["test"])
    frame = pd.DataFrame({"text": [task.input_example, *task.check_texts(test)]})
    served = PeftflowModel.from_loaded(load_trained(Path(trained.model_dir)))
    expected = served.predict(None, frame)
    with tempfile.TemporaryDirectory() as scratch:
        fmt = ctx.cfg.tracking.model_format
        model_dir = folder_to_log(Path(trained.model_dir), fmt, Path(scratch))
        return log_and_register_model(
            trained.run_id,
            model_dir,
            ctx.cfg.tracking.model_name,
            tracking_uri(ctx.cfg, ctx.root),
            python_model=str(ENTRY_POINT),
            input_example=example,
            signature=infer_signature(example, expected.iloc[:1]),
            pip_requirements=runtime_requirements(),
            check=lambda predict: assert_same_predictions(expected, predict(frame)),
            code_paths=[str(stage_runtime(Path(scratch) / "code"))],
            flavor_info=flavor_info(model_dir),
        )


def promote(ctx: RunContext, state: PipelineState) -> PromotionDecision:
    """Move alias ``champion`` only when the gate passes; the decision is recorded either way.

    The gate judges the candidate against the champion on the same test examples
    (:mod:`peftflow.pipeline.gate`).
    """
    settings, uri = ctx.cfg.tracking, tracking_uri(ctx.cfg, ctx.root)
    name, version = state.registered.name, state.registered.version
    return promote_if_better(
        name,
        version,
        uri,
        metric=settings.promote_metric,
        margin=settings.promote_margin,
        require_tags=GATE_TAGS,
        evidence_for=evidence_for(name, version, uri, settings.promote_metric, settings),
        min_test_examples=settings.promote_min_test_examples,
    )
