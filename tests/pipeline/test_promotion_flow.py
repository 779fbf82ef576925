"""Promotion and rollback as Prefect flows (what a schedule or a deployment runs)."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from peftflow.tracking.promotion import DECISION_TAG, REASON_TAG
from tests.tracking import test_registry

MODEL = test_registry.MODEL
new_version = test_registry.new_version  # the fixture: versions with chosen metrics and tags

pytestmark = [pytest.mark.server]


def test_promote_flow_gates_records_and_rolls_back(prefect_server, new_version, tracking_uri):
    from flows.promote import promote, rollback

    first = new_version({"test_f1": 0.90})
    better = new_version({"test_f1": 0.95})
    worse = new_version({"test_f1": 0.91})

    assert promote(MODEL, first, tracking_uri=tracking_uri)["promoted"] is True
    assert promote(MODEL, better, tracking_uri=tracking_uri, margin=0.02)["promoted"] is True
    refused = promote(MODEL, worse, tracking_uri=tracking_uri)  # a result, not a failed flow
    assert refused["promoted"] is False and "not better" in refused["reason"]

    client = MlflowClient(tracking_uri)
    tags = client.get_model_version(MODEL, worse).tags
    assert tags[DECISION_TAG] == "refused" and "test_f1" in tags[REASON_TAG]
    assert rollback(MODEL, tracking_uri=tracking_uri) == first
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == first


def test_promote_flow_refuses_a_version_without_gate_tags(
    prefect_server, new_version, tracking_uri
):
    from flows.promote import promote

    unchecked = new_version({"test_f1": 0.99}, tags={"peftflow.checks_passed": "true"})
    decision = promote(MODEL, unchecked, tracking_uri=tracking_uri)
    assert decision["promoted"] is False
    assert "peftflow.logged_model_check=passed" in decision["reason"]


def test_promote_flow_rejects_a_negative_margin(prefect_server, new_version, tracking_uri):
    from flows.promote import promote
    from peftflow.errors import RegistryError

    version = new_version({"test_f1": 0.9})
    with pytest.raises(RegistryError, match="margin must be a finite number >= 0"):
        promote(MODEL, version, tracking_uri=tracking_uri, margin=-0.1)
