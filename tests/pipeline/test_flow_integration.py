"""The whole fine-tuning flow under a real (temporary) Prefect server, checked in MLflow."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from peftflow.errors import DataCheckError
from tests.conftest import synthetic_spam_table

pytestmark = [pytest.mark.server, pytest.mark.slow]


def make_project(root: Path, table: pd.DataFrame, model_dir: Path, name: str) -> Path:
    """A git repo with a user table and a config that trains a tiny model on it."""
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    table_path = root / "messages.csv"
    table[["text", "label"]].to_csv(table_path, index=False)
    config = {
        "name": name,
        "seed": 7,
        "data": {"source": "table", "path": str(table_path), "min_class_fraction": 0.1},
        "model": {"name": str(model_dir), "max_length": 48},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"epochs": 3, "batch_size": 16, "lr": 5e-3, "progress": False},
        "tracking": {
            "experiment": "integration",
            "model_name": "tiny-spam",
            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        },
    }
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def assert_mlflow_lineage(client: MlflowClient, run, root: Path, result) -> None:
    """What the MLflow UI shows of where a run came from, in MLflow's own terms."""
    tags, md5 = run.data.tags, result.data_md5
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # The code: MLflow's source tags (the flow's entry point, the project's commit).
    assert tags["mlflow.source.name"] == "flows/finetune.py:finetune"
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True)
    if head.returncode == 0:  # a project with a commit
        assert tags["mlflow.source.git.commit"] == head.stdout.decode().strip()
    # The data: one dataset input per split, digest = the DVC md5, source = its remote object.
    inputs = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
        for i in run.inputs.dataset_inputs
    }
    assert sorted(inputs) == ["test", "train", "val"]
    remote = (root / ".dvc-storage").resolve().as_uri()
    for split, dataset in inputs.items():
        assert dataset.digest == md5 and dataset.name.startswith(f"messages-{split}-")
        assert json.loads(dataset.source)["uri"] == f"{remote}/files/md5/{md5[:2]}/{md5[2:]}"
        rows = len(pd.read_parquet(result.split.paths[split]))
        assert json.loads(dataset.profile)["num_rows"] == rows > 0
    assert Path(remote.removeprefix("file://"), "files/md5", md5[:2], md5[2:]).is_file()
    # The model: a LoggedModel of the run, with its test metrics, behind the version.
    (output,) = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == run.info.run_id and logged.name == run.info.run_name
    linked = {m.key: m.value for m in logged.metrics}
    assert linked["test_f1"] == run.data.metrics["test_f1"]
    version = client.get_model_version("tiny-spam", result.registered.version)
    assert version.source == logged.artifact_location and version.run_id == run.info.run_id


def test_flow_trains_registers_promotes_and_caches(
    prefect_server, tiny_models, tmp_path, monkeypatch
):
    from flows.finetune import finetune

    root = tmp_path / "project"
    config = make_project(root, synthetic_spam_table(300), tiny_models["llama"], "tiny-lora")
    first = finetune(config_path=str(config), root=str(root))

    metrics = first.trained.metrics
    assert metrics["test_accuracy"] >= 0.9, metrics
    assert 0 < metrics["trainable_percent"] < 50
    assert first.baseline.metrics["test_accuracy"] >= 0.9
    assert first.promotion.promoted is True

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias("tiny-spam", "champion")
    assert str(champion.version) == first.registered.version
    run = client.get_run(first.trained.run_id)
    assert run.data.tags["peftflow.run_key"] == first.trained.run_key
    assert run.data.tags["peftflow.reload_check"] == "passed"
    assert run.data.params["method.name"] == "lora"
    assert len(client.get_metric_history(run.info.run_id, "epoch/val_f1")) == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"data_checks", "plots", "model_folder"} <= artifacts
    assert_mlflow_lineage(client, run, root, first)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # scoped to this test, unlike set_tracking_uri
    model = mlflow.pyfunc.load_model("models:/tiny-spam@champion")
    predictions = model.predict(pd.DataFrame({"text": ["free money winner click prize"]}))
    assert predictions["label"].tolist() == ["spam"]

    # Same config, same data: same run key, nothing retrained, nothing registered.
    second = finetune(config_path=str(config), root=str(root))
    assert second.trained.run_key == first.trained.run_key
    assert second.trained.cached is True
    assert second.registered is None
    assert len(client.search_model_versions("name='tiny-spam'")) == 1

    # Forced retrain with the same seed reproduces the metrics exactly.
    third = finetune(config_path=str(config), root=str(root), force=True, run_baseline=False)
    for key in ("test_accuracy", "test_f1", "val_f1"):
        assert third.trained.metrics[key] == metrics[key]


def test_failed_data_check_stops_before_training(prefect_server, tiny_models, tmp_path):
    from flows.finetune import finetune

    root = tmp_path / "bad-project"
    table = synthetic_spam_table(200)
    table.loc[::3, "text"] = "   "  # a third of the texts are blank
    config = make_project(root, table, tiny_models["bert"], "tiny-bad")

    with pytest.raises(DataCheckError) as err:
        finetune(config_path=str(config), root=str(root))
    assert "text" in str(err.value)
    reports = list((root / "outputs" / "reports").rglob("raw_data.md"))
    assert reports and "failed" in reports[0].read_text(), "the failed suite's report is kept"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect_client:
        artifact_keys = {artifact.key for artifact in prefect_client.read_artifacts()}
    assert "failed-raw-data" in artifact_keys
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert client.search_registered_models() == []
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`peftflow.kind` = 'finetune'"
    )
    assert runs == []
