"""`peftflow predict`: files in, input columns + predictions out, clear errors, no partial files."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from peftflow.cli.main import app
from peftflow.config.loading import parse_config
from peftflow.task.registry import build_for_training, save_trained

runner = CliRunner()


def saved_model(tmp_path, model_dir, task: str):
    if task == "generation":
        config = {
            "name": "tiny-gen",
            "task": "generation",
            "model": {"name": str(model_dir), "max_length": 48},
            "generation": {"max_new_tokens": 4, "max_response_tokens": 4},
        }
    else:
        config = {"name": "tiny-cls", "model": {"name": str(model_dir), "max_length": 32}}
    cfg = parse_config({**config, "method": {"name": "lora", "r": 2, "alpha": 4}})
    model, tokenizer, base = build_for_training(cfg)
    return save_trained(model, tokenizer, cfg, base, tmp_path / f"{task}-model")


@pytest.fixture(scope="module")
def classifier_dir(tiny_models, tmp_path_factory):
    return saved_model(tmp_path_factory.mktemp("cls"), tiny_models["bert"], "classification")


@pytest.fixture(scope="module")
def generator_dir(tiny_causal_lms, tmp_path_factory):
    return saved_model(tmp_path_factory.mktemp("gen"), tiny_causal_lms["llama"], "generation")


def invoke(*args: str):
    return runner.invoke(app, ["predict", *map(str, args)])


def test_classifier_predictions_keep_the_input_columns(classifier_dir, tmp_path):
    source = tmp_path / "in.csv"
    pd.DataFrame({"id": [1, 2, 3], "body": ["free cash now", "meeting at ten", "hi"]}).to_csv(
        source, index=False
    )
    out = tmp_path / "out" / "predictions.parquet"
    result = invoke(
        "--model",
        classifier_dir,
        "-i",
        source,
        "-o",
        out,
        "--text-column",
        "body",
        "--batch-size",
        2,
    )
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out)
    assert list(frame.columns) == ["id", "body", "label", "score", "p_ham", "p_spam"]
    assert frame["id"].tolist() == ["1", "2", "3"]  # CSV values are kept verbatim (as text)
    assert set(frame["label"]) <= {"ham", "spam"}
    assert ((frame["p_ham"] + frame["p_spam"]).round(5) == 1).all()


def test_generator_predictions_are_generated_text_per_row(generator_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    pd.DataFrame({"text": ["budget review friday", "lunch"]}).to_json(
        source, orient="records", lines=True
    )
    out = tmp_path / "out.jsonl"
    result = invoke("--model", generator_dir, "-i", source, "-o", out, "--batch-size", 1)
    assert result.exit_code == 0, result.output
    frame = pd.read_json(out, lines=True, dtype=False)
    assert list(frame.columns) == ["text", "generated"] and len(frame) == 2


def test_missing_column_is_a_clear_error_and_writes_nothing(classifier_dir, tmp_path):
    source = tmp_path / "in.csv"
    pd.DataFrame({"message": ["hi"]}).to_csv(source, index=False)
    out = tmp_path / "out.csv"
    result = invoke("--model", classifier_dir, "-i", source, "-o", out)
    assert result.exit_code == 2
    assert "no column 'text'" in result.output and "--text-column" in result.output
    assert "message" in result.output
    assert not out.exists() and not list(tmp_path.glob(".out.csv*"))


def write_input(path, kind: str):
    """An input file that is wrong in the way ``kind`` says."""
    if kind == "missing":
        return path / "absent.csv"
    if kind == "suffix":
        (path / "in.xlsx").write_text("text\nhi\n")
        return path / "in.xlsx"
    if kind == "empty":
        (path / "in.csv").write_bytes(b"")
        return path / "in.csv"
    if kind == "latin1":
        (path / "in.csv").write_bytes("text\nhello\ncaf\xe9 ouvert\n".encode("latin-1"))
        return path / "in.csv"
    if kind == "header-only":
        (path / "in.csv").write_text("text\n")
        return path / "in.csv"
    if kind == "null":
        (path / "in.jsonl").write_text('{"text": "hi"}\n{"text": null}\n{"text": "yo"}\n')
        return path / "in.jsonl"
    assert kind == "blank"
    frame = pd.DataFrame({"id": [1, 2, 3, 4], "text": ["hi", "", "   ", "yo"]})
    frame.to_csv(path / "in.csv", index=False)
    return path / "in.csv"


@pytest.mark.parametrize(
    "kind,message",
    [
        ("missing", "input file {path} does not exist; set --input to an existing file"),
        ("suffix", "unsupported file type '.xlsx'; convert it to one of .csv, .parquet"),
        ("empty", "input file {path} is empty (0 bytes)"),
        ("latin1", "is not UTF-8 text (line 3: byte b'\\xe9'"),
        ("header-only", "has no rows; nothing to predict"),
        ("null", "has no text in 1 row(s) (data rows 2, counted from 1)"),
        ("blank", "has no text in 2 row(s) (data rows 2, 3, counted from 1)"),
    ],
)
def test_bad_input_files_are_refused_before_the_model_loads_and_write_nothing(
    tmp_path, kind, message
):
    source = write_input(tmp_path, kind)
    out = tmp_path / "out" / "predictions.csv"
    # No model at that path: an input error must come first, with nothing loaded.
    result = invoke("--model", tmp_path / "no-model-here", "-i", source, "-o", out)
    assert result.exit_code == 2, result.output
    assert message.format(path=source) in " ".join(result.output.split()), result.output
    assert not out.parent.exists()


@pytest.mark.parametrize(
    "model,output,message",
    [
        ("not-a-model", "out.csv", "neither a folder nor an MLflow URI"),
        (None, "out.xlsx", "use a .csv, .parquet, .jsonl file name"),
    ],
)
def test_bad_model_or_output_names_the_fix(classifier_dir, tmp_path, model, output, message):
    source = tmp_path / "in.csv"
    pd.DataFrame({"text": ["hi"]}).to_csv(source, index=False)
    result = invoke("--model", model or classifier_dir, "-i", source, "-o", tmp_path / output)
    assert result.exit_code == 2
    assert message in result.output


def test_unknown_registry_model_is_a_clear_error(tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    source = tmp_path / "in.csv"
    pd.DataFrame({"text": ["hi"]}).to_csv(source, index=False)
    result = invoke("--model", "models:/nobody@champion", "-i", source, "-o", tmp_path / "o.csv")
    assert result.exit_code == 2
    assert "not in the registry" in result.output and "models:/nobody@champion" in result.output
