"""Methods written as module surgeries: BitFit, bottleneck / parallel / MAM adapters.

peft has neither plain BitFit nor bottleneck adapters, so these methods edit the
:class:`~peftflow.modeling.SequenceClassifier` directly: freeze everything, then
either unfreeze the bias terms (BitFit) or insert small new modules into every
transformer block (adapters). Only the new or unfrozen tensors and the head train;
reload re-applies the same surgery (new adapters are drawn from the RNG the
caller seeded) and loads the trained tensors back (see ``model_io``). Mix-and-Match
adds peft prefix tuning on top of the parallel adapters.

Where an adapter goes is a per-architecture map (:data:`SUBLAYERS`) of module
paths inside one block. A serial adapter wraps the *output projection* of a
sublayer (attention ``o_proj``/``c_proj``/``output.dense``, MLP ``down_proj``/
``c_proj``/``output.dense``): that is exactly "after the sublayer, before its
residual add", and it sidesteps the tuple outputs of attention modules because a
projection returns a plain tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from peftflow.errors import ConfigError
from peftflow.modeling import backbone_of, transformer_blocks, unfreeze_task_head
from peftflow.peft_methods import apply_prefix_tuning

if TYPE_CHECKING:
    from peftflow.config import AdapterSettings, MethodConfig


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
            "(add the module paths to peftflow.surgery.SUBLAYERS, or use lora)"
        )
    return paths


def _replace(block: nn.Module, path: str, wrap: Callable[[nn.Module], nn.Module]) -> None:
    """Swap the submodule at ``path`` (dotted, inside ``block``) for ``wrap(submodule)``."""
    parent_path, _, leaf = path.rpartition(".")
    parent = block.get_submodule(parent_path) if parent_path else block
    setattr(parent, leaf, wrap(getattr(parent, leaf)))


def _bottleneck_like(reference: nn.Module, hidden_size: int, settings: AdapterSettings):
    """A new bottleneck on the reference module's device and dtype (bf16 backbones too)."""
    weight = next(reference.parameters())
    adapter = Bottleneck(hidden_size, settings.bottleneck, settings.dropout)
    return adapter.to(device=weight.device, dtype=weight.dtype)


def apply_bitfit(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """BitFit (Ben Zaken et al. 2021): train every bias term of the backbone + the head."""
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


def apply_bottleneck_adapter(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Serial adapters: after attention and MLP (houlsby) or after the MLP only (pfeiffer)."""
    backbone = backbone_of(model)
    paths = sublayer_paths(backbone, cfg.name)
    hidden_size = backbone.config.hidden_size
    targets = [paths.mlp_out]
    if cfg.adapter.placement == "houlsby":
        targets.insert(0, paths.attention_out)
    model.requires_grad_(False)  # before insertion: the new adapters stay trainable

    def wrap(projection: nn.Module) -> nn.Module:
        return SerialAdapter(projection, _bottleneck_like(projection, hidden_size, cfg.adapter))

    for block in transformer_blocks(backbone):
        for path in targets:
            _replace(block, path, wrap)
    unfreeze_task_head(model)
    return model


def apply_parallel_adapter(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """One bottleneck parallel to each block's MLP, its output scaled by method.adapter.scaling."""
    backbone = backbone_of(model)
    paths = sublayer_paths(backbone, cfg.name)
    hidden_size = backbone.config.hidden_size
    parallel = ParallelAdapterBeforeResidual if paths.mlp_adds_residual else ParallelAdapter
    model.requires_grad_(False)  # before insertion: the new adapters stay trainable

    def wrap(mlp: nn.Module) -> nn.Module:
        adapter = _bottleneck_like(mlp, hidden_size, cfg.adapter)
        return parallel(mlp, adapter, cfg.adapter.scaling)

    for block in transformer_blocks(backbone):
        _replace(block, paths.mlp, wrap)
    unfreeze_task_head(model)
    return model


def apply_mam_adapter(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Mix-and-Match (He et al. 2021): prefix tuning on attention + parallel adapters on MLPs.

    Prefix length is method.prompt.num_virtual_tokens, the adapters follow
    method.adapter (the paper: 30 prefix tokens, bottleneck 512, scaling 4).
    """
    model = apply_parallel_adapter(model, cfg)
    model = apply_prefix_tuning(model, cfg)  # peft freezes the whole backbone, adapters included
    for adapter in adapters(model):
        adapter.requires_grad_(True)
    return model


def adapters(model: nn.Module) -> list[Bottleneck]:
    """Every bottleneck inserted by the surgeries above, in module order."""
    return [module for module in model.modules() if isinstance(module, Bottleneck)]
