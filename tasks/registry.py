"""Registry stages: register a version, then promote it through the gate."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from peftflow import pipeline
from peftflow.config import ExperimentConfig


@task(name="register-model", retries=1, retry_delay_seconds=5)
def register(cfg: ExperimentConfig, run_id: str, model_dir: str, root: Path) -> dict:
    return pipeline.register_stage(cfg, run_id, model_dir, root)


@task(name="promote-model")
def promote(cfg: ExperimentConfig, name: str, version: str, root: Path) -> dict:
    return pipeline.promote_stage(cfg, name, version, root)
