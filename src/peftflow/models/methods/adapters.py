"""Bottleneck adapters as module surgeries: serial (Houlsby/Pfeiffer), parallel, Mix-and-Match.

peft has no bottleneck adapters, so these methods edit the model directly: freeze
everything, then insert small new modules into every transformer block. Only the new
tensors and the head train; reload re-applies the same surgery (new adapters are drawn
from the RNG the caller seeded) and loads the trained tensors back (see
:mod:`peftflow.models.saved`). Mix-and-Match adds peft prefix tuning on top of the
parallel adapters.

Where an adapter goes is a per-architecture map (:data:`SUBLAYERS`) of module
paths inside one block. A serial adapter wraps the *output projection* of a
sublayer (attention ``o_proj``/``c_proj``/``output.dense``, MLP ``down_proj``/
``c_proj``/``output.dense``): that is exactly "after the sublayer, before its
residual add", and it sidesteps the tuple outputs of attention modules because a
projection returns a plain tensor.

Depends on: config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from peftflow.config.methods import (
    BottleneckAdapterSettings,
    MamAdapterSettings,
    ParallelAdapterSettings,
    PrefixTuningSettings,
)
from peftflow.errors import ConfigError
from peftflow.models.backbone import transformer_blocks
from peftflow.models.classifier import backbone_of, unfreeze_task_head
from peftflow.models.methods.peft_based import apply_prefix_tuning

Settings = BottleneckAdapterSettings | ParallelAdapterSettings | MamAdapterSettings


@dataclass(frozen=True)
class SublayerPaths:
    """Module paths inside one transformer block."""

    attention_out: str  # projection closing the attention sublayer (before the residual add)
    mlp_out: str  # projection closing the MLP sublayer (before the residual add)
    mlp: str  # the module computing the MLP sublayer from its input
    # True when the MLP module also adds the residual itself and receives the MLP input as a
    # second argument (BERT's BertOutput(hidden, input_tensor)); False for mlp(x) modules.
    mlp_adds_residual: bool = False


SUBLAYERS: dict[str, SublayerPaths] = {
    "bert": SublayerPaths("attention.output.dense", "output.dense", "output", True),
    "llama": SublayerPaths("self_attn.o_proj", "mlp.down_proj", "mlp"),
    "gpt2": SublayerPaths("attn.c_proj", "mlp.c_proj", "mlp"),
}


class Bottleneck(nn.Module):
    """down-projection -> ReLU -> dropout -> up-projection: [..., H] -> [..., H].

    The up-projection starts at zero, so a fresh bottleneck outputs zeros and the
    model it is inserted into computes exactly what it computed before. Parameters:
    ``2 * H * bottleneck + bottleneck + H``.
    """

    def __init__(self, hidden_size: int, bottleneck: int, dropout: float):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(torch.relu(self.down(hidden))))


class SerialAdapter(nn.Module):
    """A sublayer's output projection followed by a residual bottleneck: ``y + adapter(y)``."""

    def __init__(self, projection: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.projection = projection
        self.adapter = adapter

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        projected = self.projection(hidden)  # [B, T, H]
        return projected + self.adapter(projected)


class ParallelAdapter(nn.Module):
    """He et al. (2021): ``mlp(x) + scaling * adapter(x)`` for MLPs called as ``mlp(x)``."""

    def __init__(self, mlp: nn.Module, adapter: Bottleneck, scaling: float):
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter
        self.scaling = scaling

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden) + self.scaling * self.adapter(hidden)  # [B, T, H]


class ParallelAdapterBeforeResidual(nn.Module):
    """The parallel adapter for BERT's ``BertOutput(h, x) = LayerNorm(dropout(dense(h)) + x)``.

    ``x`` is the MLP input. Adding ``scaling * adapter(x)`` to the residual ``x``
    equals adding it to the MLP output before the residual add and the norm, which
    is where He et al. put it, without re-implementing BertOutput.
    """

    def __init__(self, mlp_output: nn.Module, adapter: Bottleneck, scaling: float):
        super().__init__()
        self.mlp_output = mlp_output
        self.adapter = adapter
        self.scaling = scaling

    def forward(self, hidden: torch.Tensor, mlp_input: torch.Tensor) -> torch.Tensor:
        return self.mlp_output(hidden, mlp_input + self.scaling * self.adapter(mlp_input))


def sublayer_paths(backbone: nn.Module, method: str) -> SublayerPaths:
    model_type = backbone.config.model_type
    paths = SUBLAYERS.get(model_type)
    if paths is None:
        raise ConfigError(
            f"method {method!r} does not know where the attention and MLP sublayers of model "
            f"type {model_type!r} are; it supports {', '.join(sorted(SUBLAYERS))} "
            "(add the module paths to peftflow.models.methods.adapters.SUBLAYERS, or use lora)"
        )
    return paths


def _replace(block: nn.Module, path: str, wrap: Callable[[nn.Module], nn.Module]) -> None:
    """Swap the submodule at ``path`` (dotted, inside ``block``) for ``wrap(submodule)``."""
    parent_path, _, leaf = path.rpartition(".")
    parent = block.get_submodule(parent_path) if parent_path else block
    setattr(parent, leaf, wrap(getattr(parent, leaf)))


def _bottleneck_like(reference: nn.Module, hidden_size: int, settings: Settings):
    """A new bottleneck on the reference module's device and dtype (bf16 backbones too)."""
    weight = next(reference.parameters())
    adapter = Bottleneck(hidden_size, settings.bottleneck, settings.dropout)
    return adapter.to(device=weight.device, dtype=weight.dtype)


def apply_bottleneck_adapter(model: nn.Module, settings: BottleneckAdapterSettings) -> nn.Module:
    """Serial adapters: after attention and MLP (houlsby) or after the MLP only (pfeiffer)."""
    backbone = backbone_of(model)
    paths = sublayer_paths(backbone, settings.name)
    hidden_size = backbone.config.hidden_size
    targets = [paths.mlp_out]
    if settings.placement == "houlsby":
        targets.insert(0, paths.attention_out)
    model.requires_grad_(False)  # before insertion: the new adapters stay trainable

    def wrap(projection: nn.Module) -> nn.Module:
        return SerialAdapter(projection, _bottleneck_like(projection, hidden_size, settings))

    for block in transformer_blocks(backbone):
        for path in targets:
            _replace(block, path, wrap)
    unfreeze_task_head(model)
    return model


def apply_parallel_adapter(
    model: nn.Module, settings: ParallelAdapterSettings | MamAdapterSettings
) -> nn.Module:
    """One bottleneck parallel to each block's MLP, its output scaled by method.scaling."""
    backbone = backbone_of(model)
    paths = sublayer_paths(backbone, settings.name)
    hidden_size = backbone.config.hidden_size
    parallel = ParallelAdapterBeforeResidual if paths.mlp_adds_residual else ParallelAdapter
    model.requires_grad_(False)  # before insertion: the new adapters stay trainable

    def wrap(mlp: nn.Module) -> nn.Module:
        adapter = _bottleneck_like(mlp, hidden_size, settings)
        return parallel(mlp, adapter, settings.scaling)

    for block in transformer_blocks(backbone):
        _replace(block, paths.mlp, wrap)
    unfreeze_task_head(model)
    return model


def apply_mam_adapter(model: nn.Module, settings: MamAdapterSettings) -> nn.Module:
    """Mix-and-Match (He et al. 2021): prefix tuning on attention + parallel adapters on MLPs.

    Prefix length is method.num_virtual_tokens; the adapters follow method.bottleneck,
    method.scaling and method.dropout (the paper: 30 prefix tokens, bottleneck 512, scaling 4).
    """
    model = apply_parallel_adapter(model, settings)
    prefix = PrefixTuningSettings(
        num_virtual_tokens=settings.num_virtual_tokens,
        encoder_hidden_size=settings.encoder_hidden_size,
    )
    model = apply_prefix_tuning(model, prefix)  # peft freezes the whole backbone, adapters included
    for adapter in adapters(model):
        adapter.requires_grad_(True)
    return model


def adapters(model: nn.Module) -> list[Bottleneck]:
    """Every bottleneck inserted by the surgeries above, in module order."""
    return [module for module in model.modules() if isinstance(module, Bottleneck)]
