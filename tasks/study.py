"""Study stages: a variant's training nested under the study's run, the baseline, the report."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from peftflow import pipeline
from peftflow.config import ExperimentConfig
from peftflow.report import ReportHeader, write_report
from tasks.train import TRAIN_TIMEOUT_SECONDS


@task(name="train-variant", timeout_seconds=TRAIN_TIMEOUT_SECONDS)
def train_variant(
    cfg: ExperimentConfig,
    split_paths: dict[str, str],
    data_md5: str,
    report_paths: list[str],
    root: Path,
    parent_run_id: str,
) -> dict:
    return pipeline.train_stage(cfg, split_paths, data_md5, report_paths, root, parent_run_id)


@task(name="baseline")
def baseline(
    cfg: ExperimentConfig,
    split_paths: dict[str, str],
    data_md5: str,
    root: Path,
    parent_run_id: str,
) -> dict:
    return pipeline.baseline_stage(cfg, split_paths, data_md5, root, parent_run_id)


@task(name="write-study-report")
def report(
    header: ReportHeader, results: list[dict], baseline: dict | None, out_dir: Path
) -> list[str]:
    return [str(path) for path in write_report(header, results, baseline, out_dir)]
