"""Sequence classifiers built from any encoder or decoder backbone (task "classification").

One wrapper for every architecture (BERT, Llama, GPT-2): ``backbone`` produces
hidden states, ``pool`` picks one vector per sequence, ``head`` maps it to label
logits. Owning the head and the pooling (instead of each model's own
``*ForSequenceClassification``) gives every method the same module names
(``head``, ``backbone``) and every decoder the same pooling knobs.

Depends on: config.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from peftflow.config import ModelConfig
from peftflow.errors import ConfigError
from peftflow.models.assets import ResolvedModel
from peftflow.models.backbone import backbone_for, mask_positions

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
        self,
        backbone: nn.Module,
        num_labels: int,
        pooling: Pooling,
        dropout: float = 0.1,
        positions_from_mask: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        # Decoders: count positions over real tokens only (see mask_positions).
        self.positions_from_mask = positions_from_mask
        self.dropout = nn.Dropout(dropout)
        hidden_size = backbone.config.hidden_size
        self.head = nn.Linear(hidden_size, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: [B, T] -> logits [B, num_labels]."""
        position_ids = mask_positions(attention_mask) if self.positions_from_mask else None
        # use_cache=False: decoders would otherwise build a KV cache (config.use_cache)
        # that a classifier never reads, appending every layer's keys and values.
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        # Prompt/P-tuning prepend V virtual tokens: [B, V+T, H] -> the T text positions.
        hidden = hidden[:, hidden.shape[1] - input_ids.shape[1] :]
        pooled = pool(hidden, attention_mask, self.pooling)
        return self.head(self.dropout(pooled.to(self.head.weight.dtype)))


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer that produces hidden states, in a classifier or a causal LM.

    ``base_model`` is transformers' own pointer (``LlamaForCausalLM.model``,
    ``GPT2LMHeadModel.transformer``).
    """
    if isinstance(model, SequenceClassifier):
        return model.backbone
    return model.base_model


def has_task_head(model: nn.Module) -> bool:
    """Classifiers carry a new head that trains with every method; causal LMs do not.

    A causal LM's output layer is tied to its input embeddings (the vocabulary),
    which parameter-efficient methods leave frozen.
    """
    return isinstance(model, SequenceClassifier)


def unfreeze_task_head(model: nn.Module) -> None:
    if has_task_head(model):
        model.head.requires_grad_(True)


def default_pooling(family: str) -> Pooling:
    """Decoders see the whole text only at the last token; encoders see it everywhere."""
    return "last" if family == "decoder" else "mean"


def resolve_pooling(model_cfg: ModelConfig, family: str) -> Pooling:
    """``model.pooling``, with "auto" resolved for ``family``."""
    return default_pooling(family) if model_cfg.pooling == "auto" else model_cfg.pooling


def check_model_knobs(model_cfg: ModelConfig, family: str) -> None:
    """Refuse knob combinations that are meaningless or silently wrong for ``family``."""
    if family == "decoder":
        return
    if not model_cfg.causal_mask:
        raise ConfigError(
            "model.causal_mask=false applies to decoder models only; encoders are already "
            "bidirectional. Remove model.causal_mask or choose a decoder model"
        )
    if model_cfg.padding_side == "left":
        # Encoders number positions 0..T-1 including pads, so left padding would shift
        # every position and make a text's prediction depend on its batch-mates.
        raise ConfigError(
            "model.padding_side=left shifts the absolute positions of encoder models "
            "(pads would be counted); use model.padding_side: right for encoders"
        )


def build_classifier(
    resolved: ResolvedModel,
    num_labels: int,
    model_cfg: ModelConfig,
    seed: int = 0,
    quantization: object | None = None,
) -> SequenceClassifier:
    """Backbone (pretrained, or random from ``seed``) + freshly initialised, seeded head.

    ``quantization``: how the method needs the pretrained backbone loaded (QLoRA: 4-bit).
    """
    check_model_knobs(model_cfg, resolved.family)
    backbone = backbone_for(model_cfg, resolved, seed, quantization)
    if not model_cfg.causal_mask:
        # transformers 5 reads config.is_causal on every forward: create_causal_mask
        # then builds a padding-only (bidirectional) mask, and is_causal=False is
        # passed down to each attention layer, so SDPA never applies its own causal
        # flag, not even when no mask is needed (no padding).
        backbone.config.is_causal = False
    pooling = resolve_pooling(model_cfg, resolved.family)
    torch.manual_seed(seed)
    return SequenceClassifier(
        backbone,
        num_labels,
        pooling,
        dropout=model_cfg.head_dropout,
        positions_from_mask=resolved.family == "decoder",
    )
