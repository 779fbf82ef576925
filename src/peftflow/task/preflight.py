"""Checks a config must pass before any work: no data is fetched, no weights are loaded.

``parse_config`` already refuses what the config alone can tell (unknown fields,
methods or values, a method for the wrong task). What needs the *model* (its
family, architecture, context length) and the *machine* (a CUDA GPU) is checked
here from the model's ``config.json`` only, so a flow refuses a bad combination
in a second, before it ingests data, writes to DVC or opens an MLflow run. Every
problem found is reported at once, each with the valid choices.

Depends on: config, models.
"""

from __future__ import annotations

import torch

from peftflow.config import ExperimentConfig
from peftflow.errors import ConfigError
from peftflow.models.facts import ModelFacts, model_facts
from peftflow.models.methods.registry import METHODS, padding_problem
from peftflow.task.registry import task_for


def preflight(cfg: ExperimentConfig, cuda_available: bool | None = None) -> ModelFacts:
    """Refuse, before any work, every method/model/machine combination that cannot run."""
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
    spec = METHODS[name]
    if facts.family not in spec.model_families:
        return f"does not apply to {facts.family} models"
    if cfg.task not in spec.tasks:
        return f"does not apply to task {cfg.task!r}"
    if spec.requires_cuda and not cuda:
        return "needs a CUDA GPU"
    if spec.needs_biases and not facts.has_biases:
        return f"trains bias terms only, and {facts.model_type} models have none"
    return padding_problem(name, facts.model_type, cfg.model.padding_side)


def _length_problems(cfg: ExperimentConfig, facts: ModelFacts) -> list[str]:
    context = facts.context_length
    if context is None or cfg.model.max_length <= context:
        return []
    return [
        f"model.max_length {cfg.model.max_length} exceeds {cfg.model.name}'s context of "
        f"{context} positions; set model.max_length to at most {context}"
    ]


def _knob_problems(cfg: ExperimentConfig, facts: ModelFacts) -> list[str]:
    try:
        task_for(cfg).check_knobs(cfg.model, facts.family)
    except ConfigError as err:
        return [str(err)]
    return []
