"""Registry stages: register a version, promote it through the gate, roll back."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import task

from peftflow import pipeline, registry
from peftflow.config import ExperimentConfig


# No task-level retries: registration retries transient store errors itself, and a whole
# re-run after a registration that did land would give the run a second version.
@task(name="register-model")
def register(
    cfg: ExperimentConfig, run_id: str, model_dir: str, root: Path, check_path: str | None = None
) -> dict:
    return pipeline.register_stage(cfg, run_id, model_dir, root, check_path)


@task(name="promote-model")
def promote(cfg: ExperimentConfig, name: str, version: str, root: Path) -> dict:
    return pipeline.promote_stage(cfg, name, version, root)


@task(name="promote-version")
def promote_version(
    name: str, version: str, tracking_uri: str, metric: str | None, margin: float
) -> dict:
    """The same gate as `peftflow promote`, for versions registered earlier."""
    return asdict(registry.promote(name, version, tracking_uri, metric, margin))


@task(name="rollback-champion")
def rollback(name: str, tracking_uri: str) -> str:
    return registry.rollback(name, tracking_uri)
