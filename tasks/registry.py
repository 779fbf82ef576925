"""Registry tasks for versions registered earlier: promote one through the gate, roll back."""

from __future__ import annotations

from dataclasses import asdict

from prefect import task

from peftflow.pipeline.gate import promote_with_evidence
from peftflow.tracking import promotion


@task(name="promote-version")
def promote_version(
    name: str, version: str, tracking_uri: str, metric: str | None, margin: float
) -> dict:
    """The same gate as `peftflow promote`, for versions registered earlier."""
    return asdict(promote_with_evidence(name, version, tracking_uri, metric, margin))


@task(name="rollback-champion")
def rollback(name: str, tracking_uri: str) -> str:
    return promotion.rollback(name, tracking_uri)
