"""The one registry of fine-tuning methods.

Each entry maps a name to a :class:`MethodSpec` whose ``apply`` turns a freshly
built model into the model to train: either a peft wrapper or a module surgery
that freezes/unfreezes parameters. The model is a
:class:`~peftflow.modeling.SequenceClassifier` (task "classification": its new
head always trains) or a transformers causal LM (task "generation": the tied
output layer stays frozen).
Listings (``peftflow methods``), docs and the test matrix derive from
:data:`METHODS`; adding a method is adding one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from peftflow import peft_methods as peft_m
from peftflow import surgery
from peftflow.errors import ConfigError
from peftflow.modeling import backbone_of, final_norm, transformer_blocks, unfreeze_task_head

if TYPE_CHECKING:  # config validates method names against this registry at run time
    from peftflow.config import MethodConfig


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str  # "full", "selective", "additive" or "reparameterisation"
    trains: str  # human description of what receives gradients
    apply: Callable[[nn.Module, MethodConfig], nn.Module]
    families: frozenset[str] = frozenset({"encoder", "decoder"})
    # classification: a SequenceClassifier (our head); generation: a causal LM
    tasks: frozenset[str] = frozenset({"classification", "generation"})
    # merge_for_inference folds the trained weights into the base (peft merge_and_unload)
    mergeable: bool = False
    # refused with a ConfigError (before any work) where no CUDA GPU is visible
    requires_cuda: bool = False
    # training-loop hooks: told the total optimizer steps before training; called
    # after each optimizer.step() (before zero_grad) with the 1-based global step;
    # an extra loss term added to the cross-entropy
    prepare_training: Callable[[nn.Module, MethodConfig, int], None] | None = None
    after_optimizer_step: Callable[[nn.Module, int], None] | None = None
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "family": self.family,
            "trains": self.trains,
            "model_families": sorted(self.families),
            "tasks": sorted(self.tasks),
            "mergeable": self.mergeable,
            "requires_cuda": self.requires_cuda,
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
    unfreeze_task_head(model)
    return model


def apply_last_block(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Train exactly the last transformer block, the final norm and the head."""
    if cfg.n_blocks != 1:
        raise ConfigError(
            f"method 'last_block' trains exactly one block, but method.n_blocks={cfg.n_blocks}; "
            f"use method 'last_n_blocks' to train the last {cfg.n_blocks} blocks"
        )
    return _train_last_blocks(model, 1)


def apply_last_n_blocks(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Train the last ``cfg.n_blocks`` transformer blocks, the final norm and the head."""
    return _train_last_blocks(model, cfg.n_blocks)


def _train_last_blocks(model: nn.Module, n_blocks: int) -> nn.Module:
    blocks = transformer_blocks(backbone_of(model))
    if n_blocks > len(blocks):
        raise ConfigError(
            f"method.n_blocks={n_blocks} but the model has only {len(blocks)} blocks; "
            f"choose 1..{len(blocks)}"
        )
    _freeze_all(model)
    for block in blocks[-n_blocks:]:
        _unfreeze(block)
    norm = final_norm(backbone_of(model))
    if norm is not None:
        _unfreeze(norm)
    unfreeze_task_head(model)
    return model


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("full", "full", "every parameter", apply_full),
        MethodSpec(
            "last_layer",
            "selective",
            "classification head only",
            apply_last_layer,
            tasks=frozenset({"classification"}),  # a causal LM's last layer is its tied vocab
        ),
        MethodSpec(
            "last_block",
            "selective",
            "last transformer block + final norm + head",
            apply_last_block,
        ),
        MethodSpec(
            "last_n_blocks",
            "selective",
            "last n_blocks transformer blocks + final norm + head",
            apply_last_n_blocks,
        ),
        MethodSpec(
            "bitfit",
            "selective",
            "every bias term + head (refused for bias-free models such as Llama)",
            surgery.apply_bitfit,
        ),
        MethodSpec(
            "bottleneck_adapter",
            "additive",
            "serial bottleneck adapters after attention + MLP (houlsby) or MLP (pfeiffer) + head",
            surgery.apply_bottleneck_adapter,
        ),
        MethodSpec(
            "parallel_adapter",
            "additive",
            "scaled bottleneck adapter parallel to every MLP + head",
            surgery.apply_parallel_adapter,
        ),
        MethodSpec(
            "lora",
            "reparameterisation",
            "low-rank adapters on attention projections + head",
            peft_m.apply_lora,
            mergeable=True,
        ),
        MethodSpec(
            "dora",
            "reparameterisation",
            "low-rank adapters + per-layer magnitude vectors on attention projections + head",
            peft_m.apply_dora,
            mergeable=True,
        ),
        MethodSpec(
            "adalora",
            "reparameterisation",
            "SVD-form adapters with rank re-allocation on attention projections + head",
            peft_m.apply_adalora,
            mergeable=True,
            prepare_training=peft_m.adalora_prepare_training,
            after_optimizer_step=peft_m.adalora_after_optimizer_step,
            extra_loss=peft_m.adalora_orthogonal_penalty,
        ),
        MethodSpec(
            "vera",
            "reparameterisation",
            "scaling vectors around frozen shared random projections + head",
            peft_m.apply_vera,
            mergeable=True,
        ),
        MethodSpec(
            "qlora",
            "reparameterisation",
            "low-rank adapters over a 4-bit (NF4) frozen base + head; CUDA only",
            peft_m.apply_qlora,
            requires_cuda=True,
        ),
        MethodSpec(
            "ia3",
            "additive",
            "scaling vectors on keys, values and MLP activations + head",
            peft_m.apply_ia3,
            mergeable=True,
        ),
        MethodSpec(
            "ln_tuning",
            "selective",
            "LayerNorm/RMSNorm parameters + head",
            peft_m.apply_ln_tuning,
            mergeable=True,
        ),
        MethodSpec(
            "prefix_tuning",
            "additive",
            "per-layer key/value prefixes (via an MLP) + head",
            peft_m.apply_prefix_tuning,
        ),
        MethodSpec(
            "prompt_tuning",
            "additive",
            "virtual-token input embeddings + head",
            peft_m.apply_prompt_tuning,
        ),
        MethodSpec(
            "p_tuning",
            "additive",
            "virtual tokens from an MLP prompt encoder + head",
            peft_m.apply_p_tuning,
        ),
        MethodSpec(
            "mam_adapter",
            "additive",
            "prefix tuning + parallel MLP adapters (Mix-and-Match) + head",
            surgery.apply_mam_adapter,
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


def methods_markdown() -> str:
    """The README's methods table, generated from the registry (a test keeps them in sync)."""
    rows = [
        "| name | family | trains | models | tasks | merges | needs CUDA |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in METHODS.values():
        rows.append(
            f"| `{spec.name}` | {spec.family} | {spec.trains} | {', '.join(sorted(spec.families))} "
            f"| {', '.join(sorted(spec.tasks))} "
            f"| {'yes' if spec.mergeable else 'no'} | {'yes' if spec.requires_cuda else 'no'} |"
        )
    return "\n".join(rows)
