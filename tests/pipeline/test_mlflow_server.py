"""Registry life cycle against a real `mlflow server` (HTTP tracking, proxied artifacts).

Two variants run through the Prefect flow into the server, the flow's gate promotes
the better one, the CLI refuses to promote the worse one (and records why), rolls
back, and predicts through the alias; the runs carry their lineage on the server.
"""

from __future__ import annotations

import socket
import subprocess
import time
from importlib.metadata import version as package_version
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from peftflow.cli.main import app
from peftflow.errors import PeftflowError
from peftflow.tracking.promotion import DECISION_TAG, REASON_TAG
from peftflow.tracking.runs import RUN_KEY_TAG, VERSIONED_PACKAGES, ensure_experiment
from tests.conftest import synthetic_spam_table
from tests.pipeline.test_flow_integration import make_project

MODEL = "tiny-spam-server"
# Head only, one epoch, a tiny learning rate on a randomly initialised model: it cannot
# separate the classes, so its spam F1 stays far below the LoRA variant's.
WEAK = {
    "name": "tiny-weak",
    "method": {"name": "last_layer"},
    "train.epochs": 1,
    "train.lr": 1e-5,
}
STRONG = {
    "name": "tiny-lora",
    "method": {"name": "lora", "r": 4, "alpha": 8},
    "train.epochs": 3,
    "train.lr": 5e-3,
}
LINEAGE_TAGS = (
    RUN_KEY_TAG,
    "peftflow.data_md5",
    "peftflow.git_commit",
    "peftflow.git_dirty",
    "peftflow.method",
    "peftflow.task",
    "peftflow.base_model",
    *(f"peftflow.versions.{package}" for package in VERSIONED_PACKAGES),
)


def commit(root: Path, *paths: str) -> str:
    """Commit ``paths`` of the project's repo; the new HEAD."""
    git = ["git", "-C", str(root), "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "add", *paths], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "project"], check=True)
    return subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.mark.server
@pytest.mark.slow
def test_two_variants_gate_refusal_rollback_and_predict_on_a_server(
    prefect_server, mlflow_server, mlflow_server_dir, tiny_models, tmp_path, monkeypatch
):
    from flows.finetune import finetune

    root = tmp_path / "project"
    config = make_project(root, synthetic_spam_table(300), tiny_models["llama"], "tiny-server")
    first_commit = commit(root, "-A")
    server = {"tracking.tracking_uri": mlflow_server, "tracking.model_name": MODEL}
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)

    weak = finetune(config_path=str(config), root=str(root), overrides={**server, **WEAK})
    assert (weak.registered.name, weak.registered.version) == (MODEL, "1")
    assert weak.promotion.promoted is True, weak.promotion
    # The first ingest ran `dvc init` (staged files: a dirty tree); commit them, as a user would.
    second_commit = commit(root, ".dvc", ".dvcignore", ".gitignore", "data.dvc")
    strong = finetune(
        config_path=str(config), root=str(root), overrides={**server, **STRONG}, run_baseline=False
    )
    assert (strong.registered.name, strong.registered.version) == (MODEL, "2")
    assert strong.data_md5 == weak.data_md5
    weak_f1 = weak.trained.metrics["test_f1"]
    strong_f1 = strong.trained.metrics["test_f1"]
    assert strong_f1 >= 0.9 and weak_f1 < strong_f1 - 0.3, (weak_f1, strong_f1)
    assert strong.promotion.promoted is True, strong.promotion
    assert aliases(client) == {"champion": "2", "previous": "1"}

    # The run-key cache works through the server's search API: nothing retrains or registers.
    again = finetune(
        config_path=str(config), root=str(root), overrides={**server, **STRONG}, run_baseline=False
    )
    assert again.trained.cached is True
    assert again.trained.run_id == strong.trained.run_id
    assert again.registered is None
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 2

    # Lineage on the server: both runs, tags and flat params.
    lineage = (
        (weak, "last_layer", 1, first_commit, "true"),
        (strong, "lora", 3, second_commit, "false"),
    )
    for summary, method, epochs, head, dirty in lineage:
        run = client.get_run(summary.trained.run_id)
        tags = run.data.tags
        assert set(LINEAGE_TAGS) <= set(tags), sorted(set(LINEAGE_TAGS) - set(tags))
        assert tags[RUN_KEY_TAG] == summary.trained.run_key
        assert tags["peftflow.data_md5"] == summary.data_md5
        assert tags["peftflow.git_commit"] == head
        assert tags["peftflow.git_dirty"] == dirty
        assert tags["peftflow.method"] == method
        assert tags["peftflow.task"] == "classification"
        assert tags["peftflow.base_model"] == str(tiny_models["llama"])
        for package in VERSIONED_PACKAGES:
            assert tags[f"peftflow.versions.{package}"] == package_version(package)
        assert run.data.params["method.name"] == method
        assert run.data.params["train.epochs"] == str(epochs)

        # Artifacts live in the server's artifact store, never under the project's mlruns/.
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
        experiment_store = mlflow_server_dir / "artifacts" / run.info.experiment_id
        assert (experiment_store / run.info.run_id / "artifacts" / "model_folder").is_dir()
        assert {"data_checks", "model_folder"} <= {
            a.path for a in client.list_artifacts(run.info.run_id)
        }
        # The model is the run's LoggedModel, stored beside the runs in the same store.
        (output,) = run.outputs.model_outputs
        logged = client.get_logged_model(output.model_id)
        assert logged.artifact_location.startswith("mlflow-artifacts:/"), logged.artifact_location
        model_files = experiment_store / "models" / output.model_id / "artifacts"
        assert (model_files / "MLmodel").is_file()
    assert not (root / "mlruns").exists()
    assert not (Path.cwd() / "mlartifacts").exists()

    runner = CliRunner()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)  # nothing may fall back to a store in the working directory

    refused = runner.invoke(app, ["promote", "--model", MODEL, "--version", "1"])
    assert refused.exit_code == 1, refused.output
    assert "NOT promoted" in refused.output
    v1_tags = client.get_model_version(MODEL, "1").tags
    assert v1_tags[DECISION_TAG] == "refused"
    assert "not shown better" in v1_tags[REASON_TAG] and "champion v2" in v1_tags[REASON_TAG]
    assert "paired bootstrap over" in v1_tags[REASON_TAG]
    description = client.get_registered_model(MODEL).description
    assert f"v1 refused: {v1_tags[REASON_TAG]}" in description
    assert aliases(client) == {"champion": "2", "previous": "1"}

    rolled = runner.invoke(app, ["rollback", "--model", MODEL])
    assert rolled.exit_code == 0, rolled.output
    assert aliases(client) == {"champion": "1"}
    assert client.get_model_version(MODEL, "2").tags[DECISION_TAG] == "rolled_back"

    texts = synthetic_spam_table(40, seed=1)
    pd.DataFrame({"id": texts["id"], "text": texts["text"]}).to_csv(
        tmp_path / "in.csv", index=False
    )
    out = tmp_path / "out.parquet"
    predicted = runner.invoke(
        app,
        [
            "predict",
            "--model",
            f"models:/{MODEL}@champion",
            "--input",
            str(tmp_path / "in.csv"),
            "--output",
            str(out),
        ],
    )
    assert predicted.exit_code == 0, predicted.output
    written = pd.read_parquet(out)
    assert written["id"].tolist() == texts["id"].tolist()
    expected = mlflow.pyfunc.load_model(f"models:/{MODEL}/1").predict(
        pd.DataFrame({"text": texts["text"]})
    )
    pd.testing.assert_frame_equal(
        written[list(expected.columns)].reset_index(drop=True),
        expected.reset_index(drop=True),
        check_exact=False,
        atol=1e-6,
    )


def aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(MODEL).aliases.items()}


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_a_stopped_server_fails_in_seconds_with_the_fix(tmp_path, monkeypatch):
    """MLflow's client would retry a refused connection for about four minutes."""
    url = closed_port_url()
    started = time.monotonic()
    with pytest.raises(PeftflowError, match="not reachable") as err:
        ensure_experiment("e", url, tmp_path)
    assert url in str(err.value) and "mlflow server" in str(err.value)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.csv").write_text("text\nhello\n")
    args = ["predict", "-m", "models:/m@champion", "-i", "in.csv", "-o", "out.csv"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "not reachable" in result.output
    assert time.monotonic() - started < 20
    assert not (tmp_path / "out.csv").exists()
