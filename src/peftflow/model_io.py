"""Saving and reloading trained models (classifiers and generators) so they come back exactly.

A saved model folder holds:

- ``weights.safetensors``: only the tensors that were trained (the whole model
  for ``full``, the head for ``last_layer``, LoRA matrices (+ head) for ``lora``);
- ``peftflow_model.json``: the experiment config (task included), labels and a
  pinned reference to the base weights (location + fingerprint);
- ``tokenizer/``: the tokenizer as used in training.

Reloading rebuilds the base from its reference, refuses if the base weights'
fingerprint changed, re-applies the same method and loads the trained tensors.
This avoids the silent failure of logging a PEFT model whose base is not a hub
repo (base weights re-initialised on reload). Only safetensors are read: no
pickle is ever loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from peftflow.assets import ResolvedModel, resolve_model
from peftflow.config import ExperimentConfig, parse_config
from peftflow.errors import RegistryError
from peftflow.fsutil import atomic_folder
from peftflow.methods import apply_method
from peftflow.modeling import build_classifier, load_tokenizer, trained_state

META_FILE = "peftflow_model.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    config: ExperimentConfig
    labels: list[str]  # [] for generators
    base: ResolvedModel

    @property
    def task(self) -> str:
        return self.config.task


def save_model(
    model: nn.Module,
    tokenizer,
    config: ExperimentConfig,
    base: ResolvedModel,
    out_dir: Path,
) -> Path:
    """Write the model folder atomically (a crash never leaves half a model)."""
    with atomic_folder(Path(out_dir)) as staging:
        save_file(trained_state(model), str(staging / WEIGHTS_FILE))
        tokenizer.save_pretrained(str(staging / "tokenizer"))
        meta = {
            "format_version": FORMAT_VERSION,
            "config": config.model_dump(mode="json"),
            "task": config.task,
            "labels": list(config.data.labels) if config.task == "classification" else [],
            "base": base_reference(base, config),
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return Path(out_dir)


def base_reference(base: ResolvedModel, config: ExperimentConfig) -> dict:
    """The pinned base, saying whether its weights were loaded or randomly initialised.

    A random-init base is rebuilt from the base's architecture and the config's
    seed (``model.pretrained: false``); its fingerprint still pins the architecture source.
    """
    weights = "pretrained" if config.model.pretrained else f"random-init (seed {config.seed})"
    return {**base.to_dict(), "weights": weights}


def load_model(model_dir: Path, device: str = "cpu") -> LoadedModel:
    """Rebuild base + method from the pinned reference and load the trained tensors."""
    model_dir = Path(model_dir)
    meta_path = model_dir / META_FILE
    if not meta_path.is_file():
        raise RegistryError(f"{model_dir} is not a peftflow model folder (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    config = parse_config(meta["config"], source=str(meta_path))
    base = _pinned_base(meta["base"])
    tokenizer = load_tokenizer_from(model_dir / "tokenizer", config)
    model = _base_model(base, config, tokenizer)
    model = apply_method(model, config.method, base.family)
    _load_trained_tensors(model, model_dir / WEIGHTS_FILE)
    model.to(device).eval()
    return LoadedModel(model, tokenizer, config, meta.get("labels", []), base)


def _pinned_base(recorded: dict) -> ResolvedModel:
    """Resolve the base again and make sure its weights are the very same."""
    current = resolve_model(recorded["name"], recorded.get("revision"))
    if current.fingerprint != recorded["fingerprint"]:
        raise RegistryError(
            f"base model {recorded['name']!r} changed since this model was trained "
            f"(fingerprint {recorded['fingerprint']} -> {current.fingerprint}); install "
            f"{recorded.get('package_version') or recorded['location']} to reload it"
        )
    return current


def _load_trained_tensors(model: nn.Module, weights_path: Path) -> None:
    state = load_file(str(weights_path))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RegistryError(
            f"{weights_path} holds tensors the rebuilt model lacks: {result.unexpected_keys[:5]}; "
            "it was saved by an incompatible method or peftflow version"
        )


def load_tokenizer_from(folder: Path, config: ExperimentConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = config.model.padding_side
    return tokenizer


def build_for_training(config: ExperimentConfig) -> tuple[nn.Module, object, ResolvedModel]:
    """Resolve the base, build the task's model + tokenizer, apply the method."""
    base = resolve_model(config.model.name, config.model.revision)
    tokenizer = load_tokenizer(base, config.model.padding_side)
    model = _base_model(base, config, tokenizer)
    model = apply_method(model, config.method, base.family)
    return model, tokenizer, base


def build_base(config: ExperimentConfig) -> tuple[nn.Module, object, ResolvedModel]:
    """The untouched base of ``config`` (no method): the zero-shot baseline of a generator."""
    base = resolve_model(config.model.name, config.model.revision)
    tokenizer = load_tokenizer(base, config.model.padding_side)
    return _base_model(base, config, tokenizer), tokenizer, base


def _base_model(base: ResolvedModel, config: ExperimentConfig, tokenizer) -> nn.Module:
    """A classifier over the backbone, or the causal LM, before any method is applied."""
    if config.task == "generation":
        from peftflow.causal_lm import build_causal_lm, check_method_fits

        model = build_causal_lm(base, config.model, seed=config.seed)
        check_method_fits(config.method.name, model.config.model_type)
        config_with_pad = model.config
    else:
        model = build_classifier(base, len(config.data.labels), config.model, seed=config.seed)
        config_with_pad = model.backbone.config
    # Keep the model's pad id consistent with the tokenizer (decoders pad with eos).
    if tokenizer is not None and getattr(config_with_pad, "pad_token_id", None) is None:
        config_with_pad.pad_token_id = tokenizer.pad_token_id
    return model
