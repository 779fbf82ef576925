"""Promotion and rollback as flows, so they can be scheduled, deployed and audited in Prefect."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from peftflow.tracking.runs import resolve_tracking_uri
from tasks import registry


@flow(name="promote")
def promote(
    model_name: str,
    version: str,
    root: str = ".",
    tracking_uri: str | None = None,
    metric: str | None = None,
    margin: float = 0.0,
) -> dict:
    """Move alias champion to ``version`` only through the gate.

    A refusal is a result, not a failed flow; the decision and its reason are
    recorded on the model version either way.
    """
    uri = resolve_tracking_uri(tracking_uri, Path(root))
    decision = registry.promote_version(model_name, version, uri, metric, margin)
    verdict = "promoted" if decision["promoted"] else "refused"
    get_run_logger().info("%s v%s %s: %s", model_name, version, verdict, decision["reason"])
    return decision


@flow(name="rollback")
def rollback(model_name: str, root: str = ".", tracking_uri: str | None = None) -> str:
    """Give alias champion back to the version that held it before (alias previous)."""
    uri = resolve_tracking_uri(tracking_uri, Path(root))
    restored = registry.rollback(model_name, uri)
    get_run_logger().info("%s: champion is v%s again", model_name, restored)
    return restored
