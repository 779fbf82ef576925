"""The pipeline's stages as plain functions (no Prefect here).

Each stage takes and returns serialisable values (paths, dicts, strings) so the
Prefect tasks in ``tasks/`` can retry, cache and persist them; torch objects
never cross a stage boundary. ``flows/`` wires these stages in order.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd

import peftflow
from peftflow.config import ExperimentConfig
from peftflow.tracking import (
    RESUMED_TAG,
    RunTracker,
    ensure_experiment,
    find_finished_run,
    resolve_tracking_uri,
    standard_tags,
)

SPLITS = ("train", "val", "test")
logger = logging.getLogger("peftflow.pipeline")


def outputs_dir(root: Path) -> Path:
    return Path(root) / "outputs"


def tracking_uri(cfg: ExperimentConfig, root: Path) -> str:
    return resolve_tracking_uri(cfg.tracking.tracking_uri, Path(root))


# --- data -------------------------------------------------------------------


def ingest_stage(cfg: ExperimentConfig, root: Path, remote_url: str | None = None) -> dict:
    """Fetch/parse the source, gate it on the raw-data suite, then DVC-track it; returns its md5.

    The Great Expectations raw-data suite runs on the new table *before* it
    replaces the tracked data: a table that fails leaves ``data/`` and
    ``data.dvc`` as they were, with its report under
    ``outputs/reports/<name>-rejected/``. A passing report is written next to the
    other check reports of that data version (``raw_report_paths``).
    """
    from peftflow.data.ingest import ingest

    checked: list = []

    def gate(table: pd.DataFrame) -> None:
        report = raw_data_report(cfg, table)
        if not report.success:
            rejected = check_reports_dir(cfg, root, "rejected")
            _write_report(report, rejected)
            report.raise_if_failed(f"nothing was ingested; the report is in {rejected}")
        checked.append(report)

    result = ingest(cfg.data, Path(root), remote_url=remote_url, task=cfg.task, accept=gate)
    paths = _write_report(checked[0], check_reports_dir(cfg, root, result.data_md5))
    return {**asdict(result), "table_path": str(result.table_path), "raw_report_paths": paths}


def check_reports_dir(cfg: ExperimentConfig, root: Path, data_version: str) -> Path:
    """Where the data checks of ``cfg`` on one data version write their reports."""
    return outputs_dir(root) / "reports" / f"{cfg.name}-{data_version}"


def _write_report(report, report_dir: Path) -> list[str]:
    return [str(path) for path in report.write(Path(report_dir))]


def task_table(cfg: ExperimentConfig, table_path: str) -> pd.DataFrame:
    """The ingested table as the task sees it: as is, or its (prompt, response) view."""
    return task_view(cfg, pd.read_parquet(table_path))


def task_view(cfg: ExperimentConfig, table: pd.DataFrame) -> pd.DataFrame:
    """A loaded table as the task sees it: as is, or its (prompt, response) view."""
    if cfg.task == "generation":
        from peftflow.data.subjects import generation_examples

        return generation_examples(table)
    return table


def raw_data_report(cfg: ExperimentConfig, table: pd.DataFrame):
    """The task's raw-data suite (Great Expectations) on a loaded table."""
    from peftflow.checks import validate_generation_raw, validate_raw

    check = validate_generation_raw if cfg.task == "generation" else validate_raw
    return check(task_view(cfg, table), cfg.data)


def validate_raw_stage(cfg: ExperimentConfig, table_path: str, report_dir: Path) -> dict:
    """Great Expectations raw-data suite; the report is written even when it fails."""
    report = raw_data_report(cfg, pd.read_parquet(table_path))
    paths = _write_report(report, report_dir)
    report.raise_if_failed()
    return {"success": report.success, "report_paths": paths}


def split_stage(cfg: ExperimentConfig, table_path: str, data_md5: str, root: Path) -> dict:
    """Deterministic stratified split, written as parquet under outputs/splits/."""
    from peftflow import split as splitting

    table = task_table(cfg, table_path)
    if cfg.task == "generation":
        splits = splitting.split_generation(table, cfg.data.split, cfg.seed)
        summary = splitting.generation_split_summary(splits)
    else:
        splits = splitting.split_dataset(table, cfg.data.split, cfg.seed)
        summary = splitting.split_summary(splits)
    out = split_dir(cfg, data_md5, root)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in SPLITS:
        paths[name] = str(out / f"{name}.parquet")
        splits[name].to_parquet(paths[name], index=False)
    return {"paths": paths, "summary": summary}


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


def validate_splits_stage(split_paths: dict[str, str], report_dir: Path) -> dict:
    """Leakage suite; generation splits (prompt/response columns) get their own."""
    from peftflow.checks import validate_generation_splits, validate_splits

    splits = load_splits(split_paths)
    generation = all("response" in frame.columns for frame in splits.values())
    report = (validate_generation_splits if generation else validate_splits)(splits)
    paths = _write_report(report, report_dir)
    report.raise_if_failed()
    return {"success": report.success, "report_paths": paths}


def tokenisation_stage(
    cfg: ExperimentConfig, split_paths: dict[str, str], report_dir: Path
) -> dict:
    """Second GE suite: token lengths vs max_length, truncation, pad token, padding side."""
    if cfg.task == "generation":
        return generation_tokenisation_stage(cfg, split_paths, report_dir)
    from peftflow.assets import resolve_model
    from peftflow.checks import validate_tokenisation
    from peftflow.modeling import check_model_knobs, load_tokenizer

    resolved = resolve_model(cfg.model.name, cfg.model.revision)
    check_model_knobs(cfg.model, resolved.family)  # refuse bad knobs before any training work
    tokenizer = load_tokenizer(resolved, cfg.model.padding_side)
    splits = load_splits(split_paths)
    report = validate_tokenisation(
        splits,
        tokenizer,
        cfg.model.max_length,
        cfg.model.padding_side,
        cfg.data.labels,
        max_truncation_rate=cfg.model.max_truncation_rate,
    )
    paths = _write_report(report, report_dir)
    report.raise_if_failed()
    # The truncation expectation already measured every length: reuse its stats.
    observed = next(r.observed for r in report.results if "token_lengths" in (r.observed or {}))
    return {"success": report.success, "report_paths": paths, **observed}


def generation_tokenisation_stage(
    cfg: ExperimentConfig, split_paths: dict[str, str], report_dir: Path
) -> dict:
    """Generation suite: prompt+response vs context, truncation, empty targets, template."""
    from transformers import AutoConfig

    from peftflow.assets import resolve_model
    from peftflow.causal_lm import check_generation_knobs, check_method_fits
    from peftflow.checks import validate_generation_tokenisation
    from peftflow.generation_run import encode_splits
    from peftflow.modeling import load_tokenizer

    resolved = resolve_model(cfg.model.name, cfg.model.revision)
    model_config = AutoConfig.from_pretrained(resolved.location, revision=resolved.revision)
    check_generation_knobs(cfg.model, resolved)  # refuse before any training work
    check_method_fits(cfg.method.name, model_config.model_type)
    tokenizer = load_tokenizer(resolved, cfg.model.padding_side)
    fmt, encoded = encode_splits(cfg, tokenizer, load_splits(split_paths))
    report = validate_generation_tokenisation(
        encoded,
        fmt,
        max_length=cfg.model.max_length,
        max_new_tokens=cfg.generation.max_new_tokens,
        context_length=getattr(model_config, "max_position_embeddings", None),
        max_truncation_rate=cfg.model.max_truncation_rate,
    )
    paths = _write_report(report, report_dir)
    report.raise_if_failed()
    observed = next(r.observed for r in report.results if "token_lengths" in (r.observed or {}))
    return {"success": report.success, "report_paths": paths, "template": fmt.template, **observed}


def load_splits(split_paths: dict[str, str]) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(path) for name, path in split_paths.items()}


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]


# --- cache --------------------------------------------------------------------


def cached_run(cfg: ExperimentConfig, data_md5: str, root: Path) -> str | None:
    """The id of a finished run with the same run key, if any (then nothing retrains)."""
    uri = tracking_uri(cfg, root)
    ensure_experiment(cfg.tracking.experiment, uri, Path(root))
    return find_finished_run(uri, cfg.tracking.experiment, cfg.run_key(data_md5))


def run_summary(cfg: ExperimentConfig, run_id: str, root: Path) -> dict:
    """Metrics and model folder of an existing run (used when a run is served from cache)."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri(cfg, root)).get_run(run_id)
    return {
        "run_id": run_id,
        "run_key": run.data.tags.get("peftflow.run_key"),
        "metrics": dict(run.data.metrics),
        "model_dir": run.data.tags.get("peftflow.model_dir"),
        "cached": True,
    }


# --- training -----------------------------------------------------------------


def train_stage(
    cfg: ExperimentConfig,
    split_paths: dict[str, str],
    data_md5: str,
    report_paths: list[str],
    root: Path,
    parent_run_id: str | None = None,
    baseline: dict | None = None,
    extra_tags: dict[str, str] | None = None,
) -> dict:
    """Train + evaluate inside one MLflow run; save the model folder and check it reloads.

    ``parent_run_id`` nests the run under another (a study's run) in the MLflow UI;
    ``baseline`` (the baseline stage's result) lets a generator log its gain over zero-shot;
    ``extra_tags`` are set when the run starts (a reproduction says so from its first second).
    The exact config is logged as JSON (``peftflow reproduce`` rebuilds it from there).
    Training writes checkpoints under outputs/checkpoints/<run key>/: a run whose process
    was killed resumes from there when the same run key is trained again, in the same
    MLflow run (see ``_open_run``); they are deleted once the run has succeeded.
    """
    from peftflow.checkpoint import claimed
    from peftflow.generation_run import run_generation_training
    from peftflow.reproduce import log_config
    from peftflow.training_run import run_training

    uri = tracking_uri(cfg, root)
    experiment_id = ensure_experiment(cfg.tracking.experiment, uri, Path(root))
    run_key = cfg.run_key(data_md5)
    tags = {
        **standard_tags(run_key, data_md5, cfg.config_hash(), Path(root)),
        "peftflow.kind": "finetune",
        "peftflow.method": cfg.method.name,
        "peftflow.task": cfg.task,
        "peftflow.base_model": cfg.model.name,
        **(extra_tags or {}),
    }
    with claimed(_checkpoints(cfg, root, run_key)) as checkpoints, RunTracker(uri) as tracker:
        run_id = _open_run(tracker, cfg, experiment_id, tags, parent_run_id, checkpoints)
        log_config(tracker, cfg)
        for path in report_paths:
            tracker.log_artifact(path, "data_checks")
        out_dir = outputs_dir(root) / "runs" / run_id
        splits = load_splits(split_paths)
        if cfg.task == "generation":
            result = run_generation_training(cfg, splits, tracker, out_dir, baseline, checkpoints)
        else:
            result = run_training(cfg, splits, tracker, out_dir, checkpoints)
        tracker.set_tags(
            {"peftflow.model_dir": result["model_dir"], "peftflow.checks_passed": "true"}
        )
        if checkpoints:  # the run succeeded: nothing is left to resume
            checkpoints.discard()
    return {"run_id": run_id, "run_key": run_key, "cached": False, **result}


def _checkpoints(cfg: ExperimentConfig, root: Path, run_key: str):
    """The run key's checkpoints; None with train.checkpoint_every_steps 0.

    In a data-parallel launch this runs on rank 0, which writes them for every rank.
    """
    from peftflow.checkpoint import Checkpoints

    if not cfg.train.checkpoint_every_steps:
        return None
    return Checkpoints(outputs_dir(root) / "checkpoints" / run_key, run_key)


def _open_run(tracker, cfg, experiment_id, tags, parent_run_id, checkpoints) -> str:
    """Start the run, or continue the one a killed process left (its checkpoint names it).

    When that run cannot be continued (another tracking store, deleted, finished), a
    new run starts with the epochs done so far logged again. Either way the run is
    tagged ``peftflow.resumed_from`` = "epoch E step S".
    """
    from peftflow.training_run import epoch_logger

    pending = checkpoints.pending() if checkpoints else None
    if pending and pending.run_id and tracker.resume(pending.run_id, experiment_id):
        run_id = pending.run_id
    else:
        params = cfg.flat_params()
        run_id = tracker.start(experiment_id, cfg.name, tags, params, parent_run_id=parent_run_id)
        for metrics in pending.history if pending else []:
            epoch_logger(tracker)(int(metrics["epoch"]), metrics)
    if pending:
        tracker.set_tags({RESUMED_TAG: pending.position})
        logger.info("run %s resumes from %s (%s)", run_id, pending.position, pending.folder)
    if checkpoints:
        checkpoints.run_id = run_id
    return run_id


def baseline_stage(
    cfg: ExperimentConfig,
    split_paths: dict[str, str],
    data_md5: str,
    root: Path,
    parent_run_id: str | None = None,
) -> dict:
    """The task's baseline on the same split, logged as its own run (cached by its own key).

    classification: TF-IDF + logistic regression; generation: the untouched base model.
    """
    if cfg.task == "generation":
        return zero_shot_stage(cfg, split_paths, data_md5, root, parent_run_id)
    from peftflow.baseline import train_tfidf_baseline
    from peftflow.metrics import plot_confusion

    uri = tracking_uri(cfg, root)
    experiment_id = ensure_experiment(cfg.tracking.experiment, uri, Path(root))
    key = f"baseline-tfidf-{_short_hash(cfg.data.model_dump_json() + str(cfg.seed))}-{data_md5}"
    existing = find_finished_run(uri, cfg.tracking.experiment, key)
    if existing:
        return {**run_summary(cfg, existing, root), "run_key": key}
    tags = _baseline_tags(cfg, key, data_md5, root, "tfidf_logreg")
    with RunTracker(uri) as tracker:
        run_id = tracker.start(
            experiment_id,
            "baseline-tfidf-logreg",
            tags,
            {"seed": cfg.seed},
            parent_run_id=parent_run_id,
        )
        result = train_tfidf_baseline(
            load_splits(split_paths), cfg.data.labels, cfg.data.positive_label, cfg.seed
        )
        tracker.log_params({"baseline.C": result.best_c, "baseline.model": "tfidf+logreg"})
        tracker.log_metrics(result.metrics)
        png = outputs_dir(root) / "runs" / run_id / "confusion_test.png"
        plot_confusion(result.test_confusion, cfg.data.labels, "TF-IDF + LR (test)", png)
        tracker.log_artifact(png, "plots")
    return {"run_id": run_id, "run_key": key, "metrics": result.metrics, "cached": False}


def _baseline_tags(cfg: ExperimentConfig, key: str, data_md5: str, root: Path, method: str):
    """A baseline run's identity: its own key stands in for the config hash."""
    return {
        **standard_tags(key, data_md5, key, Path(root)),
        "peftflow.kind": "baseline",
        "peftflow.method": method,
        "peftflow.task": cfg.task,
    }


def zero_shot_key(cfg: ExperimentConfig, data_md5: str) -> str:
    """Everything the zero-shot scores depend on: data, split, base, prompt, decoding, seed."""
    parts = {
        "data": cfg.data.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "generation": cfg.generation.model_dump(mode="json"),
        "precision": cfg.train.precision,
        "seed": cfg.seed,
    }
    return f"baseline-zero-shot-{_short_hash(json.dumps(parts, sort_keys=True))}-{data_md5}"


def zero_shot_stage(
    cfg: ExperimentConfig,
    split_paths: dict[str, str],
    data_md5: str,
    root: Path,
    parent_run_id: str | None = None,
) -> dict:
    """The untouched base model, scored exactly as fine-tuned runs are, as its own run."""
    from peftflow.generation_run import PREDICTIONS_FILE, run_zero_shot

    uri = tracking_uri(cfg, root)
    experiment_id = ensure_experiment(cfg.tracking.experiment, uri, Path(root))
    key = zero_shot_key(cfg, data_md5)
    existing = find_finished_run(uri, cfg.tracking.experiment, key)
    if existing:
        cached = run_summary(cfg, existing, root)
        path = outputs_dir(root) / "runs" / existing / PREDICTIONS_FILE
        return {**cached, "run_key": key, "predictions_path": str(path)}
    tags = {
        **_baseline_tags(cfg, key, data_md5, root, "zero_shot"),
        "peftflow.base_model": cfg.model.name,
    }
    with RunTracker(uri) as tracker:
        run_id = tracker.start(
            experiment_id,
            "baseline-zero-shot",
            tags,
            cfg.flat_params(),
            parent_run_id=parent_run_id,
        )
        result = run_zero_shot(
            cfg, load_splits(split_paths), tracker, outputs_dir(root) / "runs" / run_id
        )
    return {"run_id": run_id, "run_key": key, "cached": False, **result}


# --- registry -----------------------------------------------------------------


# What the registry shows as the input example of each task's model.
INPUT_EXAMPLES = {
    "classification": "Subject: meeting\n\nSee you at 10 tomorrow.",
    "generation": "Hi all, the build server is down until Monday. Sorry!",
}
# Test texts the logged model must reproduce before it is registered (generation is slower).
LOGGED_CHECK_ROWS = {"classification": 16, "generation": 4}


def register_stage(
    cfg: ExperimentConfig, run_id: str, model_dir: str, root: Path, check_path: str | None = None
) -> dict:
    """Log the pyfunc model into the run, check the logged copy, register a new version.

    The check reloads the model from the store and requires the same outputs as
    the saved folder on the input example and the first rows of ``check_path``
    (the test split): probabilities within float noise, generated text identical.
    """
    from mlflow.models import infer_signature

    from peftflow import pyfunc_entry_path
    from peftflow.model_io import load_model
    from peftflow.pyfunc import PeftflowModel
    from peftflow.registry import assert_same_predictions, log_and_register_model

    example = pd.DataFrame({"text": [INPUT_EXAMPLES[cfg.task]]})
    frame = pd.concat([example, _check_texts(cfg, check_path)], ignore_index=True)
    expected = PeftflowModel.from_loaded(load_model(Path(model_dir))).predict(None, frame)
    info = log_and_register_model(
        run_id,
        Path(model_dir),
        cfg.tracking.model_name,
        tracking_uri(cfg, root),
        python_model=pyfunc_entry_path(),
        input_example=example,
        signature=infer_signature(example, expected.iloc[:1]),
        check=lambda predict: assert_same_predictions(expected, predict(frame)),
    )
    return {"name": info.name, "version": str(info.version)}


def _check_texts(cfg: ExperimentConfig, split_path: str | None) -> pd.DataFrame:
    """The first test inputs (``text`` for classifiers, ``prompt`` for generators) as ``text``."""
    if split_path is None:
        return pd.DataFrame({"text": []})
    column = "prompt" if cfg.task == "generation" else "text"
    rows = pd.read_parquet(split_path, columns=[column]).head(LOGGED_CHECK_ROWS[cfg.task])
    return pd.DataFrame({"text": rows[column].astype(str).tolist()})


def promote_stage(cfg: ExperimentConfig, name: str, version: str, root: Path) -> dict:
    """Move alias ``champion`` only when the gate passes; the decision is recorded either way."""
    from peftflow.registry import GATE_TAGS, promote_if_better

    decision = promote_if_better(
        name,
        version,
        tracking_uri(cfg, root),
        metric=cfg.tracking.promote_metric,
        margin=cfg.tracking.promote_margin,
        require_tags=GATE_TAGS,
    )
    return asdict(decision)


def write_summary(summary: dict, root: Path, name: str) -> Path:
    path = outputs_dir(root) / f"{name}-summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {**summary, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.write_text(json.dumps(summary, indent=2, default=str))
    return path
