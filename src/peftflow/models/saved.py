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

Depends on: config.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from peftflow.config import ExperimentConfig, parse_config
from peftflow.errors import RegistryError
from peftflow.fsutil import atomic_folder
from peftflow.models.assets import ResolvedModel, resolve_model
from peftflow.models.backbone import load_saved_tokenizer, load_tokenizer, trained_state
from peftflow.models.methods.registry import apply_method

# The task's model before any method: (pinned base, config, tokenizer) -> module.
BaseBuilder = Callable[[ResolvedModel, ExperimentConfig, object], nn.Module]

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
    labels: list[str],
    out_dir: Path,
) -> Path:
    """Write the model folder atomically (a crash never leaves half a model).

    ``labels``: the class names in logit order ([] for a generator).
    """
    with atomic_folder(Path(out_dir)) as staging:
        save_file(trained_state(model), str(staging / WEIGHTS_FILE))
        tokenizer.save_pretrained(str(staging / "tokenizer"))
        meta = {
            "format_version": FORMAT_VERSION,
            "config": config.model_dump(mode="json"),
            "task": config.task,
            "labels": list(labels),
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


def read_config(model_dir: Path) -> ExperimentConfig:
    """The experiment config a model folder was trained with."""
    return parse_config(_meta(Path(model_dir))["config"], source=str(Path(model_dir) / META_FILE))


def _meta(model_dir: Path) -> dict:
    meta_path = model_dir / META_FILE
    if not meta_path.is_file():
        raise RegistryError(f"{model_dir} is not a peftflow model folder (no {META_FILE})")
    return json.loads(meta_path.read_text())


def load_model(model_dir: Path, build_base: BaseBuilder, device: str = "cpu") -> LoadedModel:
    """Rebuild base + method from the pinned reference and load the trained tensors.

    ``build_base`` is the task's model builder (a classifier or a causal LM).
    """
    model_dir = Path(model_dir)
    meta = _meta(model_dir)
    config = parse_config(meta["config"], source=str(model_dir / META_FILE))
    base = _pinned_base(meta["base"])
    tokenizer = load_saved_tokenizer(model_dir / "tokenizer", config.model.padding_side)
    model = apply_method(build_base(base, config, tokenizer), config.method, base.family)
    _load_trained_tensors(model, model_dir / WEIGHTS_FILE)
    model.to(device).eval()
    return LoadedModel(model, tokenizer, config, meta.get("labels", []), base)


def build_model(config: ExperimentConfig, build_base: BaseBuilder, with_method: bool = True):
    """(model, tokenizer, base) for ``config``: resolve the base, build, apply the method.

    ``with_method=False``: the untouched base (a generator's zero-shot baseline).
    """
    base = resolve_model(config.model.name, config.model.revision)
    tokenizer = load_tokenizer(base, config.model.padding_side)
    model = build_base(base, config, tokenizer)
    if with_method:
        model = apply_method(model, config.method, base.family)
    return model, tokenizer, base


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
