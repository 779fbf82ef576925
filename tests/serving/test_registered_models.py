"""A registered PEFT model, served from the registry, gives the outputs it gave before logging."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.models import Model
from typer.testing import CliRunner

from peftflow.cli.main import app
from peftflow.config.experiment import ExperimentConfig
from peftflow.config.loading import parse_config
from peftflow.data.encoding import encode
from peftflow.data.prompting import encode_generation, prompt_format
from peftflow.errors import RegistryError
from peftflow.pipeline import stages
from peftflow.pipeline.results import PipelineState, RunContext, SplitResult
from peftflow.serving.predict import download_model, load_predictor
from peftflow.serving.pyfunc import ENTRY_POINT, PeftflowModel
from peftflow.serving.trust import untrusted_reason
from peftflow.task.classification import predict_logits
from peftflow.task.generation_decoding import generate_texts
from peftflow.task.registry import build_for_training, load_trained, save_trained
from peftflow.tracking.registration import (
    LOGGED_CHECK_TAG,
    assert_same_predictions,
    log_and_register_model,
)
from peftflow.tracking.runs import RunResult, RunTracker, ensure_experiment

TEXTS = ["win a free prize now", "lunch at noon?", "cheap pills", "see you at the meeting"]


def tiny_cfg(model_dir: Path, task: str, tracking_uri: str) -> ExperimentConfig:
    extra = {"generation": {"max_new_tokens": 5, "max_response_tokens": 4}}
    return parse_config(
        {
            "name": f"tiny-{task}",
            "task": task,
            "model": {"name": str(model_dir), "max_length": 40},
            "method": {"name": "lora", "r": 2, "alpha": 4},
            "tracking": {"tracking_uri": tracking_uri, "model_name": f"tiny-{task}"},
            **(extra if task == "generation" else {}),
        }
    )


def trained_like(cfg: ExperimentConfig):
    """A LoRA model whose adapter is not a no-op (LoRA's B starts at zero): seeded noise."""
    model, tokenizer, base = build_for_training(cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn_like(param))
    return model.eval(), tokenizer, base


def logged_run(cfg: ExperimentConfig, root: Path) -> str:
    experiment_id = ensure_experiment("registered", cfg.tracking.tracking_uri, root)
    with RunTracker(cfg.tracking.tracking_uri) as tracker:
        return tracker.start(experiment_id, cfg.name, tags={}, params={})


def check_split(root: Path, column: str) -> str:
    path = root / "test.parquet"
    pd.DataFrame({column: TEXTS}).to_parquet(path)
    return str(path)


def register_stage(cfg, run_id: str, model_dir: str, root: Path, test_path: str):
    """The pipeline's register stage for a run trained elsewhere, checked on ``test_path``."""
    state = PipelineState(
        trained=RunResult(run_id, "", {}, model_dir=model_dir),
        split=SplitResult({"test": test_path}, {}),
    )
    return stages.register(RunContext(cfg, root), state)


def test_registered_lora_classifier_serves_the_logits_it_had_before_logging(
    tiny_models, tracking_uri, tmp_path
):
    cfg = tiny_cfg(tiny_models["llama"], "classification", tracking_uri)
    model, tokenizer, base = trained_like(cfg)
    encoded = encode(tokenizer, TEXTS, [0] * len(TEXTS), cfg.model.max_length)
    logits = predict_logits(model, encoded, 8, tokenizer.pad_token_id, cfg.model.padding_side)
    before = torch.softmax(logits, dim=-1)  # [4, 2] probabilities of the in-memory model

    model_dir = save_trained(model, tokenizer, cfg, base, tmp_path / "model")
    run_id = logged_run(cfg, tmp_path)
    version = register_stage(cfg, run_id, str(model_dir), tmp_path, check_split(tmp_path, "text"))

    path_before = list(sys.path)
    served = load_predictor(f"models:/tiny-classification/{version.version}", tracking_uri)
    assert sys.path == path_before  # loading left no trace on the import path
    # Loaded as a user would, with MLflow alone: what MLflow adds to sys.path holds no
    # `peftflow` that would shadow the installed one in processes spawned later.
    mlflow.pyfunc.load_model(
        str(download_model(f"models:/tiny-classification/{version.version}", tracking_uri))
    )
    added = [Path(entry) for entry in sys.path if entry not in path_before]
    assert added and not any((entry / "peftflow").exists() for entry in added)
    sys.path[:] = path_before
    after = served(pd.DataFrame({"text": TEXTS}))
    for column, label in enumerate(cfg.data.labels):
        assert after[f"p_{label}"].tolist() == pytest.approx(before[:, column].tolist(), abs=1e-6)
    assert (before.max() - before.min()) > 1e-3  # the adapter changed something worth comparing
    assert MlflowClient(tracking_uri).get_run(run_id).data.tags[LOGGED_CHECK_TAG] == "passed"


def test_registered_model_has_signature_and_input_example(tiny_models, tracking_uri, tmp_path):
    cfg = tiny_cfg(tiny_models["bert"], "classification", tracking_uri)
    model, tokenizer, base = trained_like(cfg)
    model_dir = save_trained(model, tokenizer, cfg, base, tmp_path / "model")
    test_path = check_split(tmp_path, "text")
    register_stage(cfg, logged_run(cfg, tmp_path), str(model_dir), tmp_path, test_path)

    logged = Model.load(str(download_model("models:/tiny-classification/1", tracking_uri)))
    assert logged.signature.inputs.input_names() == ["text"]
    outputs = logged.signature.outputs.input_names()
    assert outputs == ["label", "score", *(f"p_{label}" for label in cfg.data.labels)]
    assert logged.saved_input_example_info is not None


def test_registered_lora_generator_serves_the_text_it_generated_before_logging(
    tiny_causal_lms, tracking_uri, tmp_path
):
    cfg = tiny_cfg(tiny_causal_lms["llama"], "generation", tracking_uri)
    model, tokenizer, base = trained_like(cfg)
    fmt = prompt_format(tokenizer, cfg.generation, cfg.model.max_length)
    data = encode_generation(tokenizer, fmt, TEXTS)
    before = generate_texts(model, tokenizer, data, cfg.generation, seed=cfg.seed)

    model_dir = save_trained(model, tokenizer, cfg, base, tmp_path / "model")
    run_id = logged_run(cfg, tmp_path)
    register_stage(cfg, run_id, str(model_dir), tmp_path, check_split(tmp_path, "prompt"))

    served = load_predictor("models:/tiny-generation/1", tracking_uri)
    assert served(pd.DataFrame({"text": TEXTS}))["generated"].tolist() == before
    assert any(before)  # something was generated, so equality means something


def test_a_logged_model_that_reloads_differently_is_never_registered(
    tiny_models, tracking_uri, tmp_path
):
    cfg = tiny_cfg(tiny_models["bert"], "classification", tracking_uri)
    model, tokenizer, base = trained_like(cfg)
    model_dir = save_trained(model, tokenizer, cfg, base, tmp_path / "model")
    frame = pd.DataFrame({"text": TEXTS})
    wrong = PeftflowModel.from_loaded(load_trained(model_dir)).predict(None, frame)
    wrong["p_spam"] += 0.01  # what a silently re-initialised base would look like
    run_id = logged_run(cfg, tmp_path)

    with pytest.raises(RegistryError, match="not registered.*'p_spam' differs"):
        log_and_register_model(
            run_id,
            model_dir,
            "tiny-classification",
            tracking_uri,
            python_model=str(ENTRY_POINT),
            input_example=frame.head(1),
            check=lambda predict: assert_same_predictions(wrong, predict(frame)),
        )
    client = MlflowClient(tracking_uri)
    assert client.get_run(run_id).data.tags[LOGGED_CHECK_TAG] == "failed"
    assert client.search_model_versions("name='tiny-classification'") == []
    (output,) = client.get_run(run_id).outputs.model_outputs  # marked failed, not pending
    assert client.get_logged_model(output.model_id).status == LoggedModelStatus.FAILED


@pytest.mark.parametrize(
    "expected, actual, message",
    [
        ({"a": [0.5]}, {"a": [0.5 + 1e-7]}, None),
        ({"a": [0.5]}, {"a": [0.51]}, "'a' differs by up to 1.00e-02"),
        ({"a": ["x", "y"]}, {"a": ["x", "z"]}, "differs first at row 1: 'y' != 'z'"),
        ({"a": [1.0]}, {"b": [1.0]}, "expected columns"),
        ({"a": [1.0]}, {"a": [1.0, 2.0]}, "x 2 rows"),
        ({"a": [float("nan")]}, {"a": [float("nan")]}, "differs by up to nan"),
    ],
)
def test_same_predictions_tolerates_float_noise_only(expected, actual, message):
    if message is None:
        assert_same_predictions(pd.DataFrame(expected), pd.DataFrame(actual))
        return
    with pytest.raises(RegistryError, match=message.replace("(", r"\(")):
        assert_same_predictions(pd.DataFrame(expected), pd.DataFrame(actual))


class EchoModel(mlflow.pyfunc.PythonModel):
    """A model peftflow did not log: its code is a pickled class, run on load."""

    def predict(self, context, model_input, params=None):
        return pd.DataFrame({"label": ["ham"] * len(model_input)})


def test_predict_loads_only_models_peftflow_logged_unless_trusted(
    tiny_models, tracking_uri, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    cfg = tiny_cfg(tiny_models["bert"], "classification", tracking_uri)
    model, tokenizer, base = trained_like(cfg)
    model_dir = save_trained(model, tokenizer, cfg, base, tmp_path / "model")
    register_stage(
        cfg, logged_run(cfg, tmp_path), str(model_dir), tmp_path, check_split(tmp_path, "text")
    )
    ours = download_model("models:/tiny-classification/1", tracking_uri, tmp_path / "ours")
    assert Model.load(str(ours)).flavors["peftflow"]["peftflow_version"]
    assert untrusted_reason(ours) is None

    # Tampered with after logging: the stored entry point is no longer peftflow's.
    entry = ours / ENTRY_POINT.name
    original = entry.read_text()
    entry.write_text(original + "\nimport os  # anything at all\n")
    assert "is not this peftflow's pyfunc_entry.py" in untrusted_reason(ours)
    entry.write_text(original)
    # The runtime it carries was changed, or something was added next to it.
    carried = ours / "code" / "peftflow_runtime" / "peftflow" / "models" / "saved.py"
    carried.write_text(carried.read_text() + "\nimport os\n")
    assert "peftflow_runtime/peftflow/models/saved.py) is not this" in untrusted_reason(ours)
    carried.unlink()
    assert "serving runtime (peftflow_runtime/peftflow/models/saved.py)" in untrusted_reason(ours)

    # Logged by someone else, registered in the same store.
    with mlflow.start_run() as run:
        mlflow.pyfunc.log_model(name="model", python_model=EchoModel())
    mlflow.register_model(f"runs:/{run.info.run_id}/model", "foreign")
    source = tmp_path / "in.csv"
    pd.DataFrame({"text": TEXTS}).to_csv(source, index=False)
    out = tmp_path / "out.csv"
    args = ["predict", "-m", "models:/foreign/1", "-i", str(source), "-o", str(out)]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and not out.exists()
    assert "has no 'peftflow' flavor" in refused.output and "--trust-model" in refused.output
    trusted = CliRunner().invoke(app, [*args, "--trust-model"])
    assert trusted.exit_code == 0, trusted.output
    assert pd.read_csv(out)["label"].tolist() == ["ham"] * len(TEXTS)
