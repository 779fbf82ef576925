"""Saved model formats: an adapter with a pinned base reference, or one merged full model."""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants
import pytest
from benchmarks.serve_latency import lay_out_hub_cache

from peftflow.config.loading import parse_config
from peftflow.errors import ConfigError, RegistryError
from peftflow.models.saved import META_FILE, merge_model_dir
from peftflow.task import inference
from peftflow.task.registry import build_for_training, save_trained
from tests.conftest import build_tiny_model_dir
from tests.models.test_methods import tiny_config
from tests.serving.test_registered_models import TEXTS, trained_like


@pytest.mark.parametrize("method", ["lora", "ia3", "last_block"])
def test_a_merged_model_predicts_like_its_adapter_and_needs_no_base(tiny_models, tmp_path, method):
    base_dir = shutil.copytree(tiny_models["llama"], tmp_path / "base")
    model, tokenizer, base = trained_like(tiny_config(base_dir, method))
    adapter = save_trained(model, tokenizer, tiny_config(base_dir, method), base, tmp_path / "a")
    merged = merge_model_dir(adapter, tmp_path / "m", inference.classifier_base)
    expected = inference.predict(inference.load(adapter), TEXTS)

    shutil.rmtree(base_dir)  # the base is gone: only the merged model still loads
    got = inference.predict(inference.load(merged), TEXTS)
    assert got["label"].tolist() == expected["label"].tolist()
    assert got["p_spam"].tolist() == pytest.approx(expected["p_spam"].tolist(), abs=1e-5)
    assert json.loads((merged / META_FILE).read_text())["format"] == "merged"
    with pytest.raises(RegistryError, match="restore the folder"):
        inference.load(adapter)


def test_a_damaged_merged_model_is_refused(tiny_models, tmp_path):
    model, tokenizer, base = build_for_training(tiny_config(tiny_models["bert"], "lora"))
    cfg = tiny_config(tiny_models["bert"], "lora")
    adapter = save_trained(model, tokenizer, cfg, base, tmp_path / "a")
    merged = merge_model_dir(adapter, tmp_path / "m", inference.classifier_base)
    weights = merged / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(RegistryError, match="damaged .* download the model again"):
        inference.load(merged)


def test_methods_that_add_modules_cannot_be_logged_merged(tiny_models):
    raw = {
        "name": "merged-adapter",
        "model": {"name": str(tiny_models["bert"])},
        "method": {"name": "bottleneck_adapter"},
        "tracking": {"model_format": "merged"},
    }
    with pytest.raises(ConfigError, match="tracking.model_format: adapter"):
        parse_config(raw)
    cfg = parse_config({**raw, "tracking": {"model_format": "adapter"}})
    model, tokenizer, base = build_for_training(cfg)
    with pytest.raises(ConfigError, match="cannot be folded"):
        merge_model_dir(
            save_trained(model, tokenizer, cfg, base, tiny_models["bert"].parent / "ba"),
            tiny_models["bert"].parent / "ba-merged",
            inference.classifier_base,
        )


def test_an_adapter_finds_its_base_by_hub_id_in_the_cache_only_if_the_weights_match(
    tiny_models, tmp_path, monkeypatch
):
    """Trained on a local copy recorded with a hub id; the copy is gone, the HF cache has it."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    lay_out_hub_cache(cache, "org/tiny", tiny_models["llama"])
    cfg = tiny_config("org/tiny", "lora")
    model, tokenizer, base = trained_like(cfg)
    assert base.source == "hub" and base.hub_id == "org/tiny"  # offline: read from the cache
    adapter = save_trained(model, tokenizer, cfg, base, tmp_path / "a")
    expected = inference.predict(inference.load(adapter), TEXTS)
    assert inference.predict(inference.load(adapter), TEXTS).equals(expected)

    shutil.rmtree(cache)  # other weights under the same hub id: refused, with the fix
    lay_out_hub_cache(cache, "org/tiny", build_tiny_model_dir("llama", tmp_path / "other", seed=5))
    with pytest.raises(RegistryError, match="wrong weights") as refused:
        inference.load(adapter)
    assert "make org/tiny reachable" in str(refused.value)
    shutil.rmtree(cache)
    with pytest.raises(RegistryError, match="not available here"):
        inference.load(adapter)


def test_the_model_format_is_not_part_of_the_run_key(tiny_models):
    """How a trained model is logged never changes what was trained: a cached run serves both."""
    raw = {"name": "fmt", "model": {"name": str(tiny_models["bert"])}}
    adapter = parse_config({**raw, "tracking": {"model_format": "adapter"}})
    merged = parse_config({**raw, "tracking": {"model_format": "merged"}})
    other = parse_config({**raw, "seed": 7})
    assert adapter.run_key("md5") == merged.run_key("md5") != other.run_key("md5")


def test_online_an_adapter_downloads_its_base_by_hub_id_and_checks_its_files(
    tiny_models, tmp_path, monkeypatch
):
    """The recorded source is gone; online, the hub id's files are fetched (a stand-in for
    huggingface_hub's download here: no network) and must match the recorded fingerprint."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    lay_out_hub_cache(cache, "org/tiny", tiny_models["llama"])
    cfg = tiny_config("org/tiny", "lora")
    model, tokenizer, base = trained_like(cfg)
    adapter = save_trained(model, tokenizer, cfg, base, tmp_path / "a")
    expected = inference.predict(inference.load(adapter), TEXTS)
    shutil.rmtree(cache)

    on_the_hub = {"weights": tiny_models["llama"]}
    fetched = []

    def snapshot_download(repo_id, revision=None, local_files_only=False, **kwargs):
        if local_files_only and not (cache / "fetched").exists():
            raise LocalEntryNotFoundError("not in the cache")
        fetched.append((repo_id, kwargs.get("allow_patterns")))
        target = cache / "fetched"
        shutil.rmtree(target, ignore_errors=True)
        return str(shutil.copytree(on_the_hub["weights"], target))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert inference.predict(inference.load(adapter), TEXTS).equals(expected)
    assert fetched[0][0] == "org/tiny" and "*.safetensors" in fetched[0][1]

    on_the_hub["weights"] = build_tiny_model_dir("llama", tmp_path / "retrained", seed=9)
    shutil.rmtree(cache)
    with pytest.raises(RegistryError, match="wrong weights"):
        inference.load(adapter)
