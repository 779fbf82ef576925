"""The one registry of fine-tuning methods.

Each entry maps a name to a :class:`MethodSpec` whose ``apply`` turns a freshly
built :class:`~peftflow.modeling.SequenceClassifier` into the model to train:
either a peft wrapper or a module surgery that freezes/unfreezes parameters.
Listings (``peftflow methods``), docs and the test matrix derive from
:data:`METHODS`; adding a method is adding one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from peftflow.errors import ConfigError
from peftflow.modeling import final_norm, transformer_blocks

if TYPE_CHECKING:  # config validates method names against this registry at run time
    from peftflow.config import MethodConfig

# Default LoRA targets per backbone type: every attention projection.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value", "attention.output.dense"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt2": ("c_attn", "attn.c_proj"),
}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str  # "full", "selective" or "reparameterisation"
    trains: str  # human description of what receives gradients
    apply: Callable[[nn.Module, MethodConfig], nn.Module]
    families: frozenset[str] = frozenset({"encoder", "decoder"})

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "family": self.family,
            "trains": self.trains,
            "model_families": sorted(self.families),
        }


def _freeze_all(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def _unfreeze(module: nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad_(True)


def apply_full(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    _unfreeze(model)
    return model


def apply_last_layer(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    _freeze_all(model)
    _unfreeze(model.head)
    return model


def apply_last_blocks(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Train the last ``cfg.n_blocks`` transformer blocks, the final norm and the head."""
    blocks = transformer_blocks(model.backbone)
    if cfg.n_blocks > len(blocks):
        raise ConfigError(
            f"method.n_blocks={cfg.n_blocks} but the model has only {len(blocks)} blocks; "
            f"choose 1..{len(blocks)}"
        )
    _freeze_all(model)
    for block in blocks[-cfg.n_blocks :]:
        _unfreeze(block)
    norm = final_norm(model.backbone)
    if norm is not None:
        _unfreeze(norm)
    _unfreeze(model.head)
    return model


def apply_lora(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """peft LoRA on the attention projections; the head trains fully and is saved with it."""
    from peft import LoraConfig, get_peft_model

    model_type = model.backbone.config.model_type
    targets = cfg.lora.target_modules or LORA_TARGETS.get(model_type)
    if not targets:
        raise ConfigError(
            f"no default LoRA targets for model type {model_type!r}; "
            "set method.lora.target_modules to the names of its linear layers"
        )
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(targets),
        modules_to_save=["head"],
        fan_in_fan_out=model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
    )
    return get_peft_model(model, lora)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("full", "full", "every parameter", apply_full),
        MethodSpec("last_layer", "selective", "classification head only", apply_last_layer),
        MethodSpec(
            "last_block",
            "selective",
            "last n_blocks transformer blocks + final norm + head",
            apply_last_blocks,
        ),
        MethodSpec(
            "lora",
            "reparameterisation",
            "low-rank adapters on attention projections + head",
            apply_lora,
        ),
    )
}


def apply_method(model: nn.Module, cfg: MethodConfig, family: str) -> nn.Module:
    """Look the method up and apply it, refusing combinations it does not support."""
    spec = METHODS.get(cfg.name)
    if spec is None:
        raise ConfigError(
            f"unknown method {cfg.name!r}; valid methods: {', '.join(sorted(METHODS))}"
        )
    if family not in spec.families:
        raise ConfigError(
            f"method {cfg.name!r} does not apply to {family} models; "
            f"it supports {', '.join(sorted(spec.families))}"
        )
    return spec.apply(model, cfg)


def list_methods() -> list[dict[str, object]]:
    return [spec.describe() for spec in METHODS.values()]
