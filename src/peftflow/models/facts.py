"""What the checks before any work need to know of a model, from its config.json alone.

No weights are loaded and nothing is converted: package aliases carry their facts
(:data:`~peftflow.models.assets.MODEL_ASSETS`), local folders and hub ids are read
from their ``config.json``.

Depends on: nothing in peftflow beyond errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from peftflow.errors import ConfigError
from peftflow.models.assets import MODEL_ASSETS, resolve_model

# Architectures whose linear layers and norms carry no bias unless their config
# turns one on (attention_bias / mlp_bias): BitFit would train nothing there.
BIAS_FREE_TYPES = ("llama", "mistral", "gemma")


@dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know of a model, read from its config.json alone."""

    family: str  # "encoder" or "decoder"
    model_type: str  # config.model_type: "bert", "llama", "gpt2", ...
    context_length: int | None  # positions the model can attend over (None: unbounded)
    has_biases: bool


def model_facts(name: str, revision: str | None) -> ModelFacts:
    """The model's facts from its config.json (package alias, local folder or hub)."""
    asset = MODEL_ASSETS.get(name)
    if asset is not None and asset.facts is not None:  # known without converting weights
        if asset.package is None:
            resolve_model(name, revision)  # a hub-only alias: refused while offline
        return ModelFacts(asset.family, *asset.facts)
    resolved = resolve_model(name, revision)
    return facts_from_config(_model_config(resolved.location, resolved.revision), resolved.family)


def facts_from_config(config: dict, family: str) -> ModelFacts:
    """ModelFacts of a parsed config.json (the keys differ between architectures)."""
    model_type = config.get("model_type", "")
    context = config.get("max_position_embeddings") or config.get("n_positions")
    biased = model_type not in BIAS_FREE_TYPES or bool(
        config.get("attention_bias") or config.get("mlp_bias")
    )
    return ModelFacts(family, model_type, context, biased)


def _model_config(location: str, revision: str | None) -> dict:
    folder = Path(location)
    if folder.is_dir():
        return json.loads((folder / "config.json").read_text())
    from transformers import AutoConfig  # a hub id: fetches config.json only

    try:
        return AutoConfig.from_pretrained(location, revision=revision).to_dict()
    except OSError as err:
        raise ConfigError(
            f"could not read the config.json of hub model {location!r} ({err}); check the "
            "network and the model id, or point model.name at a local folder"
        ) from None
