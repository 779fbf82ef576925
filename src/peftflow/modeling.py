"""Sequence classifiers built from any encoder or decoder backbone.

One wrapper for every architecture (BERT, Llama, GPT-2): ``backbone`` produces
hidden states, ``pool`` picks one vector per sequence, ``head`` maps it to label
logits. Owning the head and the pooling (instead of each model's own
``*ForSequenceClassification``) gives every method the same module names
(``head``, ``backbone``) and every decoder the same pooling knobs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from peftflow.assets import ResolvedModel
from peftflow.errors import ConfigError

Pooling = Literal["last", "first", "mean"]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: Pooling) -> torch.Tensor:
    """Reduce hidden states [B, T, H] to [B, H] using the attention mask [B, T].

    ``last`` uses the mask, not the pad id: GPT-style models pad with eos, so the
    pad id also appears as a real token. Works for left and right padding.
    """
    mask = attention_mask.to(hidden.dtype)
    if how == "mean":
        summed = (hidden * mask.unsqueeze(-1)).sum(dim=1)  # [B, H]
        return summed / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    positions = torch.arange(hidden.shape[1], device=hidden.device)  # [T]
    if how == "last":
        index = (positions * attention_mask).argmax(dim=1)  # [B] last real position
    elif how == "first":
        # first real position: the smallest masked-in index
        index = torch.where(attention_mask.bool(), positions, hidden.shape[1]).argmin(dim=1)
    else:
        raise ConfigError(f"unknown pooling {how!r}; choose last, first or mean")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # [B, H]


class SequenceClassifier(nn.Module):
    """backbone -> pooled hidden state -> dropout -> linear head."""

    def __init__(
        self, backbone: nn.Module, num_labels: int, pooling: Pooling, dropout: float = 0.1
    ):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        hidden_size = backbone.config.hidden_size
        self.head = nn.Linear(hidden_size, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: [B, T] -> logits [B, num_labels]."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = pool(hidden, attention_mask, self.pooling)
        return self.head(self.dropout(pooled.to(self.head.weight.dtype)))


def default_pooling(family: str) -> Pooling:
    """Decoders see the whole text only at the last token; encoders see it everywhere."""
    return "last" if family == "decoder" else "mean"


def load_tokenizer(resolved: ResolvedModel, padding_side: str = "right"):
    """Tokenizer with a pad token defined (decoders without one pad with eos)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolved.location, revision=resolved.revision)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer of {resolved.name} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_backbone(resolved: ResolvedModel, dtype: str = "float32") -> nn.Module:
    """The bare transformer (no LM/classification head), with SDPA attention."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(
        resolved.location,
        revision=resolved.revision,
        dtype=getattr(torch, dtype),
        attn_implementation="sdpa",
    )


def build_classifier(
    resolved: ResolvedModel,
    num_labels: int,
    pooling: Pooling | None = None,
    dtype: str = "float32",
    seed: int = 0,
) -> SequenceClassifier:
    """Backbone + freshly initialised head (seeded so the head init is reproducible)."""
    backbone = load_backbone(resolved, dtype)
    torch.manual_seed(seed)
    return SequenceClassifier(backbone, num_labels, pooling or default_pooling(resolved.family))


def transformer_blocks(backbone: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks, for BERT (encoder.layer), Llama (layers), GPT-2 (h)."""
    for path in ("encoder.layer", "layers", "h", "transformer.h", "model.layers"):
        module = backbone
        for attr in path.split("."):
            module = getattr(module, attr, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise ConfigError(
        f"cannot find the transformer blocks of {type(backbone).__name__}; "
        "supported: BERT-style (encoder.layer), Llama-style (layers), GPT-2-style (h)"
    )


def final_norm(backbone: nn.Module) -> nn.Module | None:
    """The norm after the last block (Llama ``norm``, GPT-2 ``ln_f``); BERT has none."""
    for name in ("norm", "ln_f", "final_layer_norm"):
        module = getattr(backbone, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total
