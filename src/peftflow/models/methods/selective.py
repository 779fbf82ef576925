"""Selective methods: train a chosen part of the model as it is (no new parameters).

Full fine-tuning, the head alone, the last block(s), and BitFit (Ben Zaken et al. 2021:
the bias terms). peft has no plain BitFit, so it is written here.

Depends on: config.
"""

from __future__ import annotations

from torch import nn

from peftflow.config.methods import (
    BitFitSettings,
    FullSettings,
    LastBlockSettings,
    LastLayerSettings,
    LastNBlocksSettings,
)
from peftflow.errors import ConfigError
from peftflow.models.backbone import final_norm, transformer_blocks
from peftflow.models.classifier import backbone_of, unfreeze_task_head


def apply_full(model: nn.Module, settings: FullSettings) -> nn.Module:
    model.requires_grad_(True)
    return model


def apply_last_layer(model: nn.Module, settings: LastLayerSettings) -> nn.Module:
    model.requires_grad_(False)
    unfreeze_task_head(model)
    return model


def apply_last_block(model: nn.Module, settings: LastBlockSettings) -> nn.Module:
    """Train exactly the last transformer block, the final norm and the head."""
    return train_last_blocks(model, 1)


def apply_last_n_blocks(model: nn.Module, settings: LastNBlocksSettings) -> nn.Module:
    """Train the last ``n_blocks`` transformer blocks, the final norm and the head."""
    return train_last_blocks(model, settings.n_blocks)


def train_last_blocks(model: nn.Module, n_blocks: int) -> nn.Module:
    blocks = transformer_blocks(backbone_of(model))
    if n_blocks > len(blocks):
        raise ConfigError(
            f"method.n_blocks={n_blocks} but the model has only {len(blocks)} blocks; "
            f"choose 1..{len(blocks)}"
        )
    model.requires_grad_(False)
    for block in blocks[-n_blocks:]:
        block.requires_grad_(True)
    norm = final_norm(backbone_of(model))
    if norm is not None:
        norm.requires_grad_(True)
    unfreeze_task_head(model)
    return model


def apply_bitfit(model: nn.Module, settings: BitFitSettings) -> nn.Module:
    """BitFit: train every bias term of the backbone + the head."""
    backbone = backbone_of(model)
    biases = [p for name, p in backbone.named_parameters() if name.endswith("bias")]
    if not biases:
        raise ConfigError(
            f"method 'bitfit' trains only bias terms, but this {backbone.config.model_type} "
            "model has none (Llama-style linear layers and RMSNorm are bias-free); "
            "use ln_tuning (norm weights) or lora instead"
        )
    model.requires_grad_(False)
    for bias in biases:
        bias.requires_grad_(True)
    unfreeze_task_head(model)
    return model
