"""The fine-tuning flow on a generation task, under a real (temporary) Prefect server."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import synthetic_generation_table

pytestmark = [pytest.mark.server, pytest.mark.slow]


def make_project(root: Path, model_dir: Path) -> Path:
    """A git repo with a prompt/response JSONL table and a LoRA generation config."""
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    table = synthetic_generation_table(200).rename(
        columns={"prompt": "document", "response": "summary"}
    )
    table_path = root / "docs.jsonl"
    table[["document", "summary"]].to_json(table_path, orient="records", lines=True)
    config = {
        "name": "tiny-subjects",
        "task": "generation",
        "seed": 5,
        "data": {
            "source": "table",
            "path": str(table_path),
            "prompt_column": "document",
            "response_column": "summary",
        },
        "model": {"name": str(model_dir), "max_length": 48},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"epochs": 3, "batch_size": 8, "lr": 1e-2, "progress": False},
        "generation": {
            "instruction": "Name the topic.",
            "max_new_tokens": 6,
            "max_response_tokens": 8,
            "n_logged_samples": 5,
        },
        "tracking": {
            "experiment": "integration-generation",
            "model_name": "tiny-subjects",
            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        },
    }
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_generation_flow_scores_against_zero_shot_registers_and_serves(
    prefect_server, tiny_causal_lms, tmp_path, monkeypatch
):
    from flows.finetune import finetune

    root = tmp_path / "project"
    config = make_project(root, tiny_causal_lms["llama"])
    first = finetune(config_path=str(config), root=str(root))

    metrics = first.trained.metrics
    zero_shot = first.baseline.metrics
    assert metrics["test_loss"] < zero_shot["test_loss"]  # it learned the task
    assert metrics["test_bleu_gain"] == pytest.approx(metrics["test_bleu"] - zero_shot["test_bleu"])
    assert {"test_chrf", "test_rouge1", "test_rouge2", "test_rougeL", "test_exact_match"} <= set(
        metrics
    )
    assert first.promotion.promoted is True
    assert first.split.summary["splits"]["test"]["rows"] > 0

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.get_run(first.trained.run_id)
    assert run.data.tags["peftflow.task"] == "generation"
    assert run.data.tags["peftflow.reload_check"] == "passed"
    assert run.data.tags["peftflow.bleu_signature"].startswith("nrefs:1")
    samples = json.loads(
        Path(client.download_artifacts(run.info.run_id, "samples"))
        .joinpath("test_samples.json")
        .read_text()
    )
    assert {"input", "reference", "prediction", "zero_shot"} <= set(samples["columns"])
    checks = {a.path for a in client.list_artifacts(run.info.run_id, "data_checks")}
    assert any("generation_tokenisation" in path for path in checks)
    baseline_run = client.get_run(first.baseline.run_id)
    assert baseline_run.data.tags["peftflow.method"] == "zero_shot"

    champion = client.get_model_version_by_alias("tiny-subjects", "champion")
    assert str(champion.version) == first.registered.version
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    served = mlflow.pyfunc.load_model("models:/tiny-subjects@champion")
    out = served.predict(pd.DataFrame({"text": ["lunch three today now please"]}))
    assert list(out.columns) == ["generated"] and len(out) == 1
    from peftflow.serving.predict import load_predictor, predict_file

    inputs = root / "new.csv"
    pd.DataFrame({"text": ["lunch three today", "budget one now"]}).to_csv(inputs, index=False)
    predictor = load_predictor("models:/tiny-subjects@champion", uri)
    written = pd.read_csv(predict_file(predictor, inputs, root / "out.csv", progress=False))
    assert list(written.columns) == ["text", "generated"] and len(written) == 2

    # Unchanged data and config: nothing trains, the zero-shot baseline is served from cache.
    second = finetune(config_path=str(config), root=str(root))
    assert second.trained.cached is True
    assert second.baseline.run_id == first.baseline.run_id
    assert second.registered is None
