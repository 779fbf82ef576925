"""Run tracking against a throwaway sqlite store (never the repo's mlflow.db)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from peftflow import __version__
from peftflow.errors import PeftflowError
from peftflow.gitinfo import git_commit, git_dirty
from peftflow.tracking.runs import (
    ERROR_TAG,
    TRUNCATION_MARK,
    RunTracker,
    ensure_experiment,
    find_finished_run,
    resolve_tracking_uri,
    standard_tags,
)


@pytest.fixture
def experiment_id(tracking_uri: str, tmp_path: Path) -> str:
    return ensure_experiment("spam", tracking_uri, tmp_path)


def test_tracking_uri_prefers_explicit_then_env_then_project_sqlite(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"
    assert resolve_tracking_uri(None, tmp_path) == "http://tracking:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_experiment_is_created_once_with_artifacts_under_root_mlruns(tracking_uri, tmp_path):
    first = ensure_experiment("spam", tracking_uri, tmp_path)
    assert ensure_experiment("spam", tracking_uri, tmp_path) == first
    experiment = MlflowClient(tracking_uri).get_experiment(first)
    assert experiment.artifact_location == (tmp_path.resolve() / "mlruns").as_uri()


def test_deleted_experiment_is_refused_with_the_restore_command(tracking_uri, tmp_path):
    experiment_id = ensure_experiment("spam", tracking_uri, tmp_path)
    MlflowClient(tracking_uri).delete_experiment(experiment_id)
    with pytest.raises(PeftflowError, match="mlflow experiments restore"):
        ensure_experiment("spam", tracking_uri, tmp_path)


def test_run_records_params_metrics_tags_and_artifacts(tracking_uri, experiment_id, tmp_path):
    report = tmp_path / "report.txt"
    report.write_text("all good")
    with RunTracker(tracking_uri) as tracker:
        parent_id = tracker.client.create_run(experiment_id).info.run_id
        run_id = tracker.start(
            experiment_id,
            "lora-r8",
            tags={"peftflow.run_key": "abc"},
            params={"lr": 1e-3, "r": 8, "long": "x" * 7000},
            parent_run_id=parent_id,
        )
        tracker.log_metrics({"train_loss": 0.9, "val_f1": 0.5}, step=0)
        tracker.log_metrics({"train_loss": 0.4, "val_f1": 0.8}, step=1)
        tracker.log_artifact(report, artifact_path="reports")
        tracker.log_dict({"labels": ["ham", "spam"]}, "labels.json")
        tracker.set_tags({"peftflow.checks_passed": True})

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "lora-r8"
    assert run.data.params["lr"] == "0.001" and run.data.params["r"] == "8"
    assert len(run.data.params["long"]) == 6000
    assert run.data.params["long"].endswith(TRUNCATION_MARK)
    assert run.data.tags["peftflow.run_key"] == "abc"
    assert run.data.tags["peftflow.checks_passed"] == "True"
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    history = client.get_metric_history(run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.4)]
    assert {a.path for a in client.list_artifacts(run_id)} == {"reports", "labels.json"}
    assert Path(client.download_artifacts(run_id, "reports/report.txt")).read_text() == "all good"
    labels = json.loads(Path(client.download_artifacts(run_id, "labels.json")).read_text())
    assert labels == {"labels": ["ham", "spam"]}


def test_exception_marks_run_failed_records_error_and_reraises(tracking_uri, experiment_id):
    with pytest.raises(RuntimeError, match="loss is nan"), RunTracker(tracking_uri) as tracker:
        run_id = tracker.start(experiment_id, "boom", tags={}, params={})
        raise RuntimeError("loss is nan")
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[ERROR_TAG] == "RuntimeError: loss is nan"


def test_misuse_gets_clear_errors(tracking_uri, experiment_id, tmp_path):
    tracker = RunTracker(tracking_uri)
    with pytest.raises(PeftflowError, match=r"call RunTracker.start\(...\) first"):
        tracker.log_metrics({"f1": 1.0}, step=0)
    tracker.start(experiment_id, "r", tags={}, params={})
    with pytest.raises(PeftflowError, match="'f1' has non-numeric value 'high'"):
        tracker.log_metrics({"f1": "high"}, step=0)
    with pytest.raises(PeftflowError, match="does not exist"):
        tracker.log_artifact(tmp_path / "missing.png")
    with pytest.raises(PeftflowError, match="not terminal"):
        tracker.finish("RUNNING")
    tracker.finish()
    with pytest.raises(PeftflowError, match="call RunTracker.start"):
        tracker.finish()


def test_finished_run_with_the_key_is_found_and_failed_ones_ignored(tracking_uri, experiment_id):
    assert find_finished_run(tracking_uri, "spam", "key1") is None
    with pytest.raises(ValueError), RunTracker(tracking_uri) as tracker:
        tracker.start(experiment_id, "failed", tags={"peftflow.run_key": "key1"}, params={})
        raise ValueError("crash")
    assert find_finished_run(tracking_uri, "spam", "key1") is None

    with RunTracker(tracking_uri) as tracker:
        done = tracker.start(experiment_id, "done", tags={"peftflow.run_key": "key1"}, params={})
    assert find_finished_run(tracking_uri, "spam", "key1") == done
    assert find_finished_run(tracking_uri, "spam", "key2") is None
    assert find_finished_run(tracking_uri, "no-such-experiment", "key1") is None


def test_standard_tags_outside_git(tmp_path):
    tags = standard_tags("runkey", "md5", "cfg", tmp_path)
    assert tags["peftflow.run_key"] == "runkey"
    assert tags["peftflow.data_md5"] == "md5"
    assert tags["peftflow.config_hash"] == "cfg"
    assert tags["peftflow.git_commit"] == "unknown"
    assert tags["peftflow.git_dirty"] == "false"
    assert tags["peftflow.version"] == __version__
    assert tags["peftflow.versions.mlflow"] == "3.17.2"
    assert tags["peftflow.versions.torch"].startswith("2.13.0")
    assert {"peftflow.versions.transformers", "peftflow.versions.peft"} <= tags.keys()


def test_git_commit_and_dirty_flag_follow_the_working_tree(tmp_path):
    def git(*args: str) -> str:
        command = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "train.py").write_text("print(1)\n")
    git("add", "train.py")
    git("commit", "-q", "-m", "first")
    assert git_commit(tmp_path) == git("rev-parse", "HEAD")
    assert not git_dirty(tmp_path)
    (tmp_path / "scratch.txt").write_text("untracked files do not count")
    assert not git_dirty(tmp_path)
    (tmp_path / "train.py").write_text("print(2)\n")
    assert git_dirty(tmp_path)


def test_a_reproduction_is_never_served_as_the_cached_run(tracking_uri, experiment_id):
    tags = {"peftflow.run_key": "key3", "peftflow.kind": "reproduction"}
    with RunTracker(tracking_uri) as tracker:
        tracker.start(experiment_id, "reproduction", tags=tags, params={})
    assert find_finished_run(tracking_uri, "spam", "key3") is None
    with RunTracker(tracking_uri) as tracker:
        original = tracker.start(
            experiment_id, "original", tags={"peftflow.run_key": "key3"}, params={}
        )
    assert find_finished_run(tracking_uri, "spam", "key3") == original
