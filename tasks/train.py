"""Training stages. Results are paths and metrics, never torch objects."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from peftflow import pipeline
from peftflow.config import ExperimentConfig

TRAIN_TIMEOUT_SECONDS = 6 * 3600


@task(name="preflight")
def preflight(cfg: ExperimentConfig) -> dict:
    """Model, method and machine checks from config.json alone: refuse before any work."""
    from dataclasses import asdict

    from peftflow.preflight import preflight as check

    return asdict(check(cfg))


@task(name="find-cached-run")
def find_cached_run(cfg: ExperimentConfig, data_md5: str, root: Path) -> str | None:
    return pipeline.cached_run(cfg, data_md5, root)


@task(name="cached-run-summary")
def cached_run_summary(cfg: ExperimentConfig, run_id: str, root: Path) -> dict:
    return pipeline.run_summary(cfg, run_id, root)


@task(name="train-and-evaluate", timeout_seconds=TRAIN_TIMEOUT_SECONDS)
def train_and_evaluate(
    cfg: ExperimentConfig,
    split_paths: dict[str, str],
    data_md5: str,
    report_paths: list[str],
    root: Path,
    baseline: dict | None = None,
) -> dict:
    return pipeline.train_stage(cfg, split_paths, data_md5, report_paths, root, baseline=baseline)


@task(name="baseline")
def baseline(cfg: ExperimentConfig, split_paths: dict[str, str], data_md5: str, root: Path) -> dict:
    """TF-IDF + logistic regression (classification) or the zero-shot base (generation)."""
    return pipeline.baseline_stage(cfg, split_paths, data_md5, root)
