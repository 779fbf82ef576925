"""Checks a config must pass before any work: no data is fetched, no weights are loaded.

``parse_config`` already refuses what the config alone can tell (unknown fields,
methods or values, a method for the wrong task). What needs the *model* (its
family, architecture, context length) and the *machine* (a CUDA GPU) is checked
here from the model's ``config.json`` only, so a flow refuses a bad combination
in a second, before it ingests data, writes to DVC or opens an MLflow run. Every
problem found is reported at once, each with the valid choices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from peftflow.config import ExperimentConfig
from peftflow.errors import ConfigError
from peftflow.methods import METHODS

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
    from peftflow.assets import MODEL_ASSETS, resolve_model

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


def preflight(cfg: ExperimentConfig, cuda_available: bool | None = None) -> ModelFacts:
    """Refuse, before any work, every method/model/machine combination that cannot run."""
    import torch

    facts = model_facts(cfg.model.name, cfg.model.revision)
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    problems = [
        *_method_problems(cfg, facts, cuda),
        *_length_problems(cfg, facts),
        *_knob_problems(cfg, facts),
    ]
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise ConfigError(f"config {cfg.name!r} cannot run here:\n{listed}")
    return facts


def _method_problems(cfg: ExperimentConfig, facts: ModelFacts, cuda: bool) -> list[str]:
    reason = method_problem(cfg.method.name, cfg, facts, cuda)
    if reason is None:
        return []
    fits = [name for name in sorted(METHODS) if method_problem(name, cfg, facts, cuda) is None]
    return [
        f"method {cfg.method.name!r} {reason}; methods that run for this model and task "
        f"here: {', '.join(fits)}"
    ]


def method_problem(name: str, cfg: ExperimentConfig, facts: ModelFacts, cuda: bool) -> str | None:
    """Why registry method ``name`` cannot train ``cfg``'s model and task here, or None."""
    from peftflow.causal_lm import generates_unbatchably

    spec = METHODS[name]
    if facts.family not in spec.families:
        return f"does not apply to {facts.family} models"
    if cfg.task not in spec.tasks:
        return f"does not apply to task {cfg.task!r}"
    if spec.requires_cuda and not cuda:
        return "needs a CUDA GPU"
    if name == "bitfit" and not facts.has_biases:
        return f"trains bias terms only, and {facts.model_type} models have none"
    if cfg.task == "generation" and generates_unbatchably(name, facts.model_type):
        return (
            f"generates differently when prompts are left-padded on {facts.model_type} "
            "(learned absolute positions)"
        )
    return None


def _length_problems(cfg: ExperimentConfig, facts: ModelFacts) -> list[str]:
    context = facts.context_length
    if context is None or cfg.model.max_length <= context:
        return []
    return [
        f"model.max_length {cfg.model.max_length} exceeds {cfg.model.name}'s context of "
        f"{context} positions; set model.max_length to at most {context}"
    ]


def _knob_problems(cfg: ExperimentConfig, facts: ModelFacts) -> list[str]:
    from peftflow.modeling import check_model_knobs

    try:
        check_model_knobs(cfg.model, facts.family)
    except ConfigError as err:
        return [str(err)]
    return []
