"""Saving and reloading trained models (classifiers and generators) so they come back exactly.

A saved model folder comes in one of two formats (``format`` in its metadata):

- ``adapter`` (what training saves): ``weights.safetensors`` holds only the tensors
  that were trained (the whole model for ``full``, the head for ``last_layer``, LoRA
  matrices (+ head) for ``lora``), and the metadata a reference to the base weights:
  package and version or hub id and revision, plus their fingerprint (MLflow's PEFT
  convention: the adapter and where its base comes from);
- ``merged`` (:func:`merge_model_dir`): the method folded into the weights, saved as one
  plain transformers model under ``base/`` (plus the classifier's head in
  ``weights.safetensors``); it needs no base from anywhere.

Both hold ``peftflow_model.json`` (the experiment config, task included, labels, the
base reference) and ``tokenizer/`` (as used in training). Reloading an adapter rebuilds
the base from its reference (installed package, local folder, or the hub: online or its
local cache), refuses a base whose fingerprint differs, re-applies the method and loads
the trained tensors. Only safetensors are read: no pickle is ever loaded.

Depends on: config.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from peftflow.config import ExperimentConfig, FullSettings, merges_into_base, parse_config
from peftflow.errors import ConfigError, RegistryError
from peftflow.fsutil import atomic_folder
from peftflow.models.assets import (
    ResolvedModel,
    downloaded_hub_model,
    fingerprint,
    hub_offline,
    resolve_model,
)
from peftflow.models.backbone import load_saved_tokenizer, load_tokenizer, trained_state
from peftflow.models.classifier import has_task_head
from peftflow.models.methods.registry import apply_method

# The task's model before any method: (pinned base, config, tokenizer) -> module.
BaseBuilder = Callable[[ResolvedModel, ExperimentConfig, object], nn.Module]

META_FILE = "peftflow_model.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 1
ADAPTER, MERGED = "adapter", "merged"
BUNDLED_BASE = "base"  # a merged folder's transformers model


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
            "format": ADAPTER,
        }
        _write_meta(staging, meta)
    return Path(out_dir)


def _write_meta(folder: Path, meta: dict) -> None:
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def merge_model_dir(model_dir: Path, out_dir: Path, build_base: BaseBuilder) -> Path:
    """Write ``model_dir``'s model as one full model (format ``merged``) to ``out_dir``.

    peft's ``merge_and_unload`` folds the adapter into the base weights (a classifier's
    trained head copy takes the head's place); a selective method's model is plain already.
    Methods that add modules (bottleneck adapters, virtual tokens) cannot merge.
    """
    loaded = load_model(Path(model_dir), build_base)
    if not merges_into_base(loaded.config.method):
        raise ConfigError(
            f"method {loaded.config.method.name!r} adds modules that cannot be folded into the "
            "base weights; log it with tracking.model_format: adapter"
        )
    model = (
        loaded.model.merge_and_unload()
        if hasattr(loaded.model, "merge_and_unload")
        else loaded.model
    )
    meta = read_meta(model_dir)
    with atomic_folder(Path(out_dir)) as staging:
        # Classifier: the backbone is the transformers model, the head stays ours.
        # Causal LM: the whole model is the transformers model.
        transformers_model = model.backbone if has_task_head(model) else model
        transformers_model.save_pretrained(str(staging / BUNDLED_BASE), safe_serialization=True)
        head = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
        save_file(
            {k: v.detach().contiguous().clone() for k, v in head.items()},
            str(staging / WEIGHTS_FILE),
        )
        loaded.tokenizer.save_pretrained(str(staging / "tokenizer"))
        bundled = {"location": BUNDLED_BASE, "fingerprint": fingerprint(staging / BUNDLED_BASE)}
        _write_meta(staging, {**meta, "format": MERGED, "bundled_base": bundled})
    return Path(out_dir)


def base_reference(base: ResolvedModel, config: ExperimentConfig) -> dict:
    """The pinned base, saying whether its weights were loaded or randomly initialised.

    A random-init base is rebuilt from the base's architecture and the config's
    seed (``model.pretrained: false``); its fingerprint still pins the architecture source.
    """
    weights = (
        "pretrained" if config.model.pretrained else f"random-init (seed {config.training_seed})"
    )
    return {**base.to_dict(), "weights": weights}


def read_meta(model_dir: Path) -> dict:
    """A model folder's metadata (config, task, labels, base reference, format)."""
    meta_path = Path(model_dir) / META_FILE
    if not meta_path.is_file():
        raise RegistryError(f"{model_dir} is not a peftflow model folder (no {META_FILE})")
    return json.loads(meta_path.read_text())


def load_model(model_dir: Path, build_base: BaseBuilder, device: str = "cpu") -> LoadedModel:
    """Rebuild base + method from the pinned reference and load the trained tensors.

    ``build_base`` is the task's model builder (a classifier or a causal LM).
    """
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    config = parse_config(meta["config"], source=str(model_dir / META_FILE))
    tokenizer = load_saved_tokenizer(model_dir / "tokenizer", config.model.padding_side)
    if meta.get("format", ADAPTER) == MERGED:
        base = _bundled_base(model_dir, meta)
        model = build_base(base, plain_model_config(config), tokenizer)
    else:
        base = _pinned_base(meta["base"])
        model = apply_method(build_base(base, config, tokenizer), config.method, base.family)
    _load_trained_tensors(model, model_dir / WEIGHTS_FILE)
    model.to(device).eval()
    return LoadedModel(model, tokenizer, config, meta.get("labels", []), base)


def plain_model_config(config: ExperimentConfig) -> ExperimentConfig:
    """How a merged model's architecture is rebuilt: pretrained weights (the bundled ones),
    not quantised, no method left to apply (as for method ``full``)."""
    model = config.model.model_copy(update={"pretrained": True})
    return config.model_copy(update={"model": model, "method": FullSettings()})


def _bundled_base(model_dir: Path, meta: dict) -> ResolvedModel:
    """The merged model's own weights, checked against the fingerprint written with them."""
    bundled = meta["bundled_base"]
    folder = model_dir / bundled["location"]
    found = fingerprint(folder) if folder.is_dir() else "missing"
    if found != bundled["fingerprint"]:
        raise RegistryError(
            f"the merged model's weights in {folder} are damaged (fingerprint "
            f"{bundled['fingerprint']} -> {found}); download the model again"
        )
    family = meta["base"]["family"]
    return ResolvedModel(meta["base"]["name"], str(folder), "local", family, None, found)


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
    """Resolve the base again and make sure its weights are the very same.

    Where the recorded source is gone (the package is not installed, the folder was
    moved) the same weights are looked for under their hub id, online or in the local
    Hugging Face cache; they are used only if their fingerprint matches.
    """
    candidates = _base_candidates(recorded)
    for current in candidates:
        if same_base(recorded, current):
            return current
    fix = _base_fix(recorded)
    if not candidates:
        raise RegistryError(f"the base model {recorded['name']!r} is not available here; {fix}")
    found = ", ".join(f"{c.location} ({c.fingerprint})" for c in candidates)
    raise RegistryError(
        f"the adapter was trained on base {recorded['name']!r} with fingerprint "
        f"{recorded['fingerprint']}, but the base found here differs: {found}. "
        f"It would load onto the wrong weights, so it is refused; {fix}"
    )


def _base_candidates(recorded: dict) -> list[ResolvedModel]:
    """Where the recorded base can be found on this machine (recorded source first); a base
    recorded by its files' fingerprint is then looked for by its hub id's files."""
    found: list[ResolvedModel] = []
    for name in dict.fromkeys((recorded["name"], recorded.get("hub_id"))):
        if not name:
            continue
        try:
            found.append(resolve_model(name, recorded.get("revision")))
        except ConfigError:
            continue
    by_content = not recorded["fingerprint"].startswith("hub:") and not hub_offline()
    if by_content and recorded.get("hub_id") and not any(same_base(recorded, c) for c in found):
        files = downloaded_hub_model(recorded["name"], recorded["hub_id"], recorded.get("revision"))
        found.extend([files] if files else [])
    return found


def same_base(recorded: dict, current: ResolvedModel) -> bool:
    """The same weights: equal fingerprints, or the same pinned hub revision when the base was
    recorded online by its revision only (``hub:<id>@<revision>``)."""
    if current.fingerprint == recorded["fingerprint"]:
        return True
    pin = f"hub:{current.hub_id}@{current.revision or 'main'}"
    return current.source == "hub" and recorded["fingerprint"] == pin


def _base_fix(recorded: dict) -> str:
    where = [recorded.get("package_version") and f"install {recorded['package_version']}"]
    if recorded.get("hub_id"):
        where.append(f"make {recorded['hub_id']} reachable (online, or in the Hugging Face cache)")
    if recorded.get("source") == "local":
        where.append(f"restore the folder {recorded['location']}")
    options = "; or ".join(w for w in where if w)
    return (
        f"{options + '; or ' if options else ''}log the model with tracking.model_format: merged, "
        "which carries its own weights"
    )


def _load_trained_tensors(model: nn.Module, weights_path: Path) -> None:
    state = load_file(str(weights_path))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RegistryError(
            f"{weights_path} holds tensors the rebuilt model lacks: {result.unexpected_keys[:5]}; "
            "it was saved by an incompatible method or peftflow version"
        )
