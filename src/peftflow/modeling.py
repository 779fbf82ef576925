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
from peftflow.attention import ATTENTION
from peftflow.config import ModelConfig
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


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] counted over real tokens: 0 at each row's first real token.

    Decoders number positions 0..T-1 by default, so a row left-padded with k pads
    would start at position k: GPT-2's learned position table would read the wrong
    rows. Llama's rotary attention depends only on position differences, so the
    shift cancels in exact arithmetic, but counting from 0 keeps it on the
    positions it was pretrained on. Pads get position 0 (clamped); they are masked.
    """
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


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
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
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

    resolved.require_weights()
    return AutoModel.from_pretrained(
        resolved.location,
        revision=resolved.revision,
        dtype=getattr(torch, dtype),
        attn_implementation=ATTENTION,
        use_safetensors=True,  # never unpickle a .bin checkpoint (see docs/reliability.md)
    )


def random_backbone(resolved: ResolvedModel, dtype: str, seed: int) -> nn.Module:
    """The same architecture as ``load_backbone``, randomly initialised from ``seed``.

    Seeding makes the random base a pure function of (architecture, seed), so a
    saved model rebuilds exactly the frozen base its adapters were trained on.
    """
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(resolved.location, revision=resolved.revision)
    torch.manual_seed(seed)
    return AutoModel.from_config(config, dtype=getattr(torch, dtype), attn_implementation=ATTENTION)


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
    resolved: ResolvedModel, num_labels: int, model_cfg: ModelConfig, seed: int = 0
) -> SequenceClassifier:
    """Backbone (pretrained, or random from ``seed``) + freshly initialised, seeded head."""
    check_model_knobs(model_cfg, resolved.family)
    if model_cfg.pretrained:
        backbone = load_backbone(resolved, model_cfg.dtype)
    else:
        backbone = random_backbone(resolved, model_cfg.dtype, seed)
    if not model_cfg.causal_mask:
        # transformers 5 reads config.is_causal on every forward: create_causal_mask
        # then builds a padding-only (bidirectional) mask, and is_causal=False is
        # passed down to each attention layer, so SDPA never applies its own causal
        # flag, not even when no mask is needed (no padding).
        backbone.config.is_causal = False
    pooling = default_pooling(resolved.family) if model_cfg.pooling == "auto" else model_cfg.pooling
    torch.manual_seed(seed)
    return SequenceClassifier(
        backbone, num_labels, pooling, positions_from_mask=resolved.family == "decoder"
    )


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


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that received gradients, keyed as in ``model.state_dict()``."""
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    return {
        name: tensor.detach().to("cpu").contiguous().clone()
        for name, tensor in model.state_dict().items()
        if name in trainable
    }
