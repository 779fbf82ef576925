"""The one registry of fine-tuning methods.

Each entry joins a method's declaration (its settings class in
:mod:`peftflow.config.methods`: settings, family, tasks, ...) with its implementation:
``apply`` turns a freshly built model into the model to train, either a peft wrapper
or a module surgery that freezes, unfreezes or inserts parameters. The model is a
:class:`~peftflow.models.classifier.SequenceClassifier` (task "classification": its
new head always trains) or a transformers causal LM (task "generation": the tied
output layer stays frozen). Listings (``peftflow methods``), the docs table and the
test matrix derive from :data:`METHODS`; adding a method is one settings class and
one entry here.

Depends on: config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from peftflow.config.methods import METHOD_SETTINGS, MethodSettings
from peftflow.errors import ConfigError
from peftflow.models.methods import adapters, peft_based, selective


@dataclass(frozen=True)
class MethodSpec:
    settings: type[MethodSettings]  # the declaration: settings, family, tasks, ...
    apply: Callable[[nn.Module, MethodSettings], nn.Module]
    # Training-loop hooks: told the total optimizer steps before training; called
    # after each optimizer.step() (before zero_grad) with the 1-based global step;
    # an extra loss term added to the task's loss once per step.
    prepare_training: Callable[[nn.Module, MethodSettings, int], None] | None = None
    after_optimizer_step: Callable[[nn.Module, int], None] | None = None
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None
    # Prepends virtual-token positions that peft numbers itself, from 0 at the first
    # column: right only with right padding where positions are learned absolute ones.
    prepends_virtual_tokens: bool = False
    # Trains bias terms only: nothing to train on bias-free architectures (Llama).
    needs_biases: bool = False
    # How the pretrained base must be loaded (transformers' quantization_config), or None.
    quantization: Callable[[MethodSettings], object] | None = None

    @property
    def name(self) -> str:
        return self.settings.model_fields["name"].default

    # What the method is, as its settings class declares it.
    @property
    def family(self) -> str:
        return self.settings.family

    @property
    def trains(self) -> str:
        return self.settings.trains

    @property
    def model_families(self) -> frozenset[str]:
        return self.settings.model_families

    @property
    def tasks(self) -> frozenset[str]:
        return self.settings.tasks

    @property
    def mergeable(self) -> bool:
        return self.settings.mergeable

    @property
    def requires_cuda(self) -> bool:
        return self.settings.requires_cuda

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "family": self.family,
            "trains": self.trains,
            "model_families": sorted(self.model_families),
            "tasks": sorted(self.tasks),
            "mergeable": self.mergeable,
            "requires_cuda": self.requires_cuda,
        }


def _spec(name: str, apply, **hooks) -> MethodSpec:
    return MethodSpec(METHOD_SETTINGS[name], apply, **hooks)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        _spec("full", selective.apply_full),
        _spec("last_layer", selective.apply_last_layer),
        _spec("last_block", selective.apply_last_block),
        _spec("last_n_blocks", selective.apply_last_n_blocks),
        _spec("bitfit", selective.apply_bitfit, needs_biases=True),
        _spec("bottleneck_adapter", adapters.apply_bottleneck_adapter),
        _spec("parallel_adapter", adapters.apply_parallel_adapter),
        _spec("lora", peft_based.apply_lora),
        _spec("dora", peft_based.apply_dora),
        _spec(
            "adalora",
            peft_based.apply_adalora,
            prepare_training=peft_based.adalora_prepare_training,
            after_optimizer_step=peft_based.adalora_after_optimizer_step,
            extra_loss=peft_based.adalora_orthogonal_penalty,
        ),
        _spec("vera", peft_based.apply_vera),
        _spec("qlora", peft_based.apply_qlora, quantization=peft_based.qlora_quantization),
        _spec("ia3", peft_based.apply_ia3),
        _spec("ln_tuning", peft_based.apply_ln_tuning),
        _spec("prefix_tuning", peft_based.apply_prefix_tuning),
        _spec("prompt_tuning", peft_based.apply_prompt_tuning, prepends_virtual_tokens=True),
        _spec("p_tuning", peft_based.apply_p_tuning, prepends_virtual_tokens=True),
        _spec("mam_adapter", adapters.apply_mam_adapter),
    )
}


def base_quantization(settings: MethodSettings):
    """The ``quantization_config`` the method's base is loaded with (None: full precision)."""
    quantization = METHODS[settings.name].quantization
    return quantization(settings) if quantization else None


if list(METHODS) != list(METHOD_SETTINGS):  # a declared method without code, or the reverse
    raise ImportError(
        f"peftflow.config.methods declares {list(METHOD_SETTINGS)} but the registry "
        f"implements {list(METHODS)}: add the missing entry to both"
    )

# Model types whose positions are a learned table indexed from the first column.
ABSOLUTE_POSITION_TYPES = ("gpt2",)


def apply_method(model: nn.Module, settings: MethodSettings, family: str) -> nn.Module:
    """Apply the configured method, refusing a model family it does not support."""
    spec = METHODS[settings.name]
    if family not in settings.model_families:
        raise ConfigError(
            f"method {settings.name!r} does not apply to {family} models; "
            f"it supports {', '.join(sorted(settings.model_families))}"
        )
    return spec.apply(model, settings)


def padding_problem(method: str, model_type: str, padding_side: str) -> str | None:
    """Why ``method`` on ``model_type`` would depend on the padding around a text, or None.

    Virtual-token methods number positions from the first column, pads included: with
    left padding a learned absolute position table (GPT-2) then reads the wrong rows.
    Rotary models (Llama) are unaffected: only position differences matter there.
    """
    if not METHODS[method].prepends_virtual_tokens or padding_side != "left":
        return None
    if model_type not in ABSOLUTE_POSITION_TYPES:
        return None
    return (
        f"on {model_type} (learned absolute positions) depends on the padding when texts are "
        "left-padded; use prefix_tuning or lora with this model, right padding (classification), "
        "or a rotary model such as smollm2-135m"
    )


def list_methods() -> list[dict[str, object]]:
    return [spec.describe() for spec in METHODS.values()]


def methods_markdown() -> str:
    """The docs' methods table, generated from the registry (a test keeps them in sync)."""
    rows = [
        "| name | family | trains | models | tasks | merges | needs CUDA |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in METHODS.values():
        d = spec.describe()
        rows.append(
            f"| `{d['name']}` | {d['family']} | {d['trains']} | {', '.join(d['model_families'])} "
            f"| {', '.join(d['tasks'])} "
            f"| {'yes' if d['mergeable'] else 'no'} | {'yes' if d['requires_cuda'] else 'no'} |"
        )
    return "\n".join(rows)
