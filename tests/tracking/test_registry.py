"""Gated champion promotion, decision records and rollback, on a throwaway sqlite registry."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from peftflow.errors import RegistryError
from peftflow.tracking.promotion import (
    DECISION_TAG,
    GATE_TAGS,
    REASON_TAG,
    current_champion,
    promote_if_better,
    rollback,
)
from peftflow.tracking.registration import (
    default_pip_requirements,
    download_logged_model,
    log_and_register_model,
)
from peftflow.tracking.runs import RunTracker, ensure_experiment

MODEL = "spam-classifier"
CHECKS_PASSED = GATE_TAGS


class KeywordModel(mlflow.pyfunc.PythonModel):
    """Stands in for the real classifier: spam iff the text contains the keyword in model_dir."""

    def load_context(self, context):
        self.keyword = (Path(context.artifacts["model_dir"]) / "keyword.txt").read_text()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        return ["spam" if self.keyword in text else "ham" for text in model_input["text"]]


@pytest.fixture
def new_version(tracking_uri: str, tmp_path: Path):
    """Register a version whose source run has ``metrics`` and ``tags``; return its version string.

    Registers by source URI (no model logging) so gate tests stay fast.
    """
    experiment_id = ensure_experiment("spam", tracking_uri, tmp_path)
    client = MlflowClient(tracking_uri)

    def register(metrics: dict[str, float], tags: dict[str, str] = CHECKS_PASSED) -> str:
        with RunTracker(tracking_uri) as tracker:
            run_id = tracker.start(experiment_id, "candidate", tags=tags, params={})
            tracker.log_metrics(metrics, step=0)
        if not client.search_registered_models(f"name = '{MODEL}'"):
            client.create_registered_model(MODEL)
        source = f"runs:/{run_id}/model"
        return str(client.create_model_version(MODEL, source, run_id=run_id).version)

    return register


def version_tags(tracking_uri: str, version: str) -> dict[str, str]:
    return MlflowClient(tracking_uri).get_model_version(MODEL, version).tags


def aliases(tracking_uri: str) -> dict[str, str]:
    model = MlflowClient(tracking_uri).get_registered_model(MODEL)
    return {alias: str(version) for alias, version in model.aliases.items()}


def description(tracking_uri: str) -> str:
    return MlflowClient(tracking_uri).get_registered_model(MODEL).description


def test_first_version_becomes_champion(tracking_uri, new_version):
    v1 = new_version({"test_f1": 0.80})
    decision = promote_if_better(MODEL, v1, tracking_uri)
    assert decision.promoted
    assert decision.candidate_metric == 0.80
    assert decision.champion_version is None and decision.champion_metric is None
    assert current_champion(MODEL, tracking_uri) == (v1, 0.80)
    assert version_tags(tracking_uri, v1)[DECISION_TAG] == "promoted"
    assert "no champion yet" in version_tags(tracking_uri, v1)[REASON_TAG]


def test_better_version_takes_over_and_old_champion_becomes_previous(tracking_uri, new_version):
    v1, v2 = new_version({"test_f1": 0.80}), new_version({"test_f1": 0.90})
    promote_if_better(MODEL, v1, tracking_uri)
    decision = promote_if_better(MODEL, v2, tracking_uri)
    assert decision.promoted
    assert (decision.champion_version, decision.champion_metric) == (v1, 0.80)
    assert aliases(tracking_uri) == {"champion": v2, "previous": v1}


def test_worse_version_is_refused_and_the_reason_recorded(tracking_uri, new_version):
    v1, v2 = new_version({"test_f1": 0.90}), new_version({"test_f1": 0.85})
    promote_if_better(MODEL, v1, tracking_uri)
    decision = promote_if_better(MODEL, v2, tracking_uri)
    assert not decision.promoted
    assert decision.reason == (
        f"candidate test_f1=0.8500 vs champion v{v1} 0.9000 + margin 0.0000: not better"
    )
    assert current_champion(MODEL, tracking_uri) == (v1, 0.90)
    tags = version_tags(tracking_uri, v2)
    assert tags[DECISION_TAG] == "refused" and tags[REASON_TAG] == decision.reason
    lines = description(tracking_uri).splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(f"v{v1} promoted: no champion yet; candidate test_f1=0.9000")
    assert lines[1].endswith(f"v{v2} refused: {decision.reason}")
    assert lines[1][:4].isdigit() and lines[1][19] == "Z"  # ISO UTC timestamp first


def test_margin_must_be_exceeded(tracking_uri, new_version):
    v1, v2 = new_version({"test_f1": 0.90}), new_version({"test_f1": 0.905})
    promote_if_better(MODEL, v1, tracking_uri)
    assert not promote_if_better(MODEL, v2, tracking_uri, margin=0.01).promoted
    assert promote_if_better(MODEL, v2, tracking_uri, margin=0.001).promoted
    assert current_champion(MODEL, tracking_uri) == (v2, 0.905)


def test_equal_metric_is_not_an_improvement(tracking_uri, new_version):
    v1, v2 = new_version({"test_f1": 0.90}), new_version({"test_f1": 0.90})
    promote_if_better(MODEL, v1, tracking_uri)
    assert not promote_if_better(MODEL, v2, tracking_uri).promoted


def test_missing_required_tags_block_even_a_better_model(tracking_uri, new_version):
    v1 = new_version({"test_f1": 0.80})
    v2 = new_version({"test_f1": 0.99}, tags={"peftflow.checks_passed": "true"})
    promote_if_better(MODEL, v1, tracking_uri, require_tags=CHECKS_PASSED)
    decision = promote_if_better(MODEL, v2, tracking_uri, require_tags=CHECKS_PASSED)
    assert not decision.promoted
    assert decision.reason == (
        "candidate run fails required tags: peftflow.reload_check=passed (found None), "
        "peftflow.logged_model_check=passed (found None)"
    )
    assert version_tags(tracking_uri, v2)[DECISION_TAG] == "refused"
    assert current_champion(MODEL, tracking_uri)[0] == v1


def test_promoting_the_champion_again_changes_nothing(tracking_uri, new_version):
    v1 = new_version({"test_f1": 0.80})
    promote_if_better(MODEL, v1, tracking_uri)
    decision = promote_if_better(MODEL, v1, tracking_uri)
    assert not decision.promoted and decision.reason == f"version {v1} is already the champion"
    assert aliases(tracking_uri) == {"champion": v1}


def test_missing_metric_or_version_is_a_registry_error(tracking_uri, new_version):
    v1 = new_version({"test_accuracy": 0.9})
    with pytest.raises(RegistryError, match=r"has no metric 'test_f1' \(it has: \['test_acc"):
        promote_if_better(MODEL, v1, tracking_uri)
    with pytest.raises(RegistryError, match="has no version '99'"):
        promote_if_better(MODEL, "99", tracking_uri)


def test_rollback_restores_previous_once(tracking_uri, new_version):
    v1, v2 = new_version({"test_f1": 0.80}), new_version({"test_f1": 0.90})
    with pytest.raises(RegistryError, match="needs both a 'champion' and a 'previous'"):
        rollback(MODEL, tracking_uri)
    promote_if_better(MODEL, v1, tracking_uri)
    promote_if_better(MODEL, v2, tracking_uri)
    assert rollback(MODEL, tracking_uri) == v1
    assert aliases(tracking_uri) == {"champion": v1}
    assert version_tags(tracking_uri, v2)[DECISION_TAG] == "rolled_back"
    assert (
        description(tracking_uri)
        .splitlines()[-1]
        .endswith(f"v{v2} rolled_back: champion returned to v{v1}")
    )
    with pytest.raises(RegistryError, match="has \\['champion'\\]"):
        rollback(MODEL, tracking_uri)


def test_no_champion_for_unknown_model(tracking_uri):
    assert current_champion("nobody", tracking_uri) is None


def test_default_requirements_pin_exact_public_versions():
    pins = default_pip_requirements()
    assert "torch==2.13.0" in pins  # local label "+cpu" dropped so GPU installs match
    assert "transformers==5.23.0" in pins and "pandas==3.1.1" in pins
    assert all("==" in pin and "+" not in pin for pin in pins)


def log_keyword_model(tracking_uri: str, root: Path, keyword: str, test_f1: float):
    """Stand-in for train-and-log: a run with ``test_f1``; its model flags ``keyword`` texts."""
    model_dir = root / f"model_{keyword}"
    model_dir.mkdir()
    (model_dir / "keyword.txt").write_text(keyword)
    experiment_id = ensure_experiment("spam", tracking_uri, root)
    with RunTracker(tracking_uri) as tracker:
        run_id = tracker.start(experiment_id, keyword, tags={}, params={})
        tracker.log_metrics({"test_f1": test_f1}, step=0)
        info = log_and_register_model(
            run_id,
            model_dir,
            MODEL,
            tracking_uri,
            python_model=KeywordModel(),
            input_example=pd.DataFrame({"text": ["win a prize", "lunch?"]}),
        )
        # Logging the model must not end the run: the tracker still owns it.
        assert MlflowClient(tracking_uri).get_run(run_id).info.status == "RUNNING"
    return run_id, info


def test_logged_model_is_served_through_the_champion_alias(tracking_uri, tmp_path, monkeypatch):
    run_id, first = log_keyword_model(tracking_uri, tmp_path, "prize", test_f1=0.9)
    _, second = log_keyword_model(tracking_uri, tmp_path, "cash", test_f1=0.5)
    assert (first.name, first.version, second.version) == (MODEL, "1", "2")
    assert first.source.startswith((tmp_path / "mlruns").as_uri())
    client = MlflowClient(tracking_uri)
    # A LoggedModel of its run (the runs table's Models column), with the run's metrics.
    (output,) = client.get_run(run_id).outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == run_id and logged.status == LoggedModelStatus.READY
    assert logged.artifact_location == first.source and logged.model_type == "peftflow"
    assert {m.key: m.value for m in logged.metrics} == {"test_f1": 0.9}
    folder = download_logged_model(tracking_uri, logged.model_id, tmp_path / "download")
    assert "torch==2.13.0" in (folder / "requirements.txt").read_text().split()
    assert promote_if_better(MODEL, first.version, tracking_uri).promoted
    assert not promote_if_better(MODEL, second.version, tracking_uri).promoted

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)  # models:/ resolves via the env
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    predictions = model.predict(pd.DataFrame({"text": ["claim your prize now", "cash at 5"]}))
    assert list(predictions) == ["spam", "ham"]


def test_log_model_refuses_a_missing_model_dir(tracking_uri, tmp_path):
    with pytest.raises(RegistryError, match="is not a folder"):
        log_and_register_model("run", tmp_path / "nope", MODEL, tracking_uri, None, None)


def test_cli_promote_refuse_and_rollback(new_version, tracking_uri, monkeypatch):
    """The gate through the CLI: promote, refuse a worse one (exit 1, reason), roll back."""
    from typer.testing import CliRunner

    from peftflow.cli.main import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    runner = CliRunner()
    first = new_version({"test_f1": 0.90})
    better = new_version({"test_f1": 0.95})
    worse = new_version({"test_f1": 0.80})

    def cli(*args: str):
        return runner.invoke(app, list(args))

    assert cli("promote", "-m", MODEL, "-v", first).exit_code == 0
    promoted = cli("promote", "-m", MODEL, "-v", better, "--margin", "0.01")
    assert promoted.exit_code == 0 and "promoted to champion" in promoted.output
    refused = cli("promote", "-m", MODEL, "-v", worse)
    assert refused.exit_code == 1 and "NOT promoted" in refused.output
    assert "test_f1" in refused.output  # the reason names the metric it compared
    assert version_tags(tracking_uri, worse)[DECISION_TAG] == "refused"
    assert aliases(tracking_uri) == {"champion": better, "previous": first}

    rolled = cli("rollback", "-m", MODEL)
    assert rolled.exit_code == 0 and f"v{first}" in rolled.output
    assert aliases(tracking_uri) == {"champion": first}
    again = cli("rollback", "-m", MODEL)
    assert again.exit_code == 2 and "cannot roll back" in again.output


def test_cli_promote_defaults_to_bleu_for_generators(new_version, tracking_uri, monkeypatch):
    from typer.testing import CliRunner

    from peftflow.cli.main import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    version = new_version({"test_bleu": 3.5}, tags={**CHECKS_PASSED, "peftflow.task": "generation"})
    result = CliRunner().invoke(app, ["promote", "-m", MODEL, "-v", version])
    assert result.exit_code == 0 and "test_bleu" in result.output, result.output


def test_a_failing_registry_is_never_read_as_no_champion(new_version, tracking_uri, monkeypatch):
    """A 503 while reading aliases must stop the gate, not promote as if there were no champion."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    version = new_version({"test_f1": 0.5})

    def unavailable(self, name):
        raise MlflowException("service unavailable", error_code=TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(MlflowClient, "get_registered_model", unavailable)
    with pytest.raises(RegistryError, match="model registry failed .*TEMPORARILY_UNAVAILABLE"):
        promote_if_better(MODEL, version, tracking_uri)
    monkeypatch.undo()
    assert current_champion(MODEL, tracking_uri) is None  # nothing was promoted


def test_promote_against_a_stopped_server_fails_fast():
    from peftflow.errors import PeftflowError
    from peftflow.tracking.promotion import promote

    with pytest.raises(PeftflowError, match="not reachable"):
        promote(MODEL, "1", "http://127.0.0.1:9")  # port 9 (discard): nothing listens
