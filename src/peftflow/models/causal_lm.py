"""Causal LMs (task "generation"): building one, and the knobs a generator refuses.

The base model is transformers' own ``AutoModelForCausalLM`` (pretrained, or the
same architecture from a seed); methods wrap it whole (peft's CAUSAL_LM task) or
edit its blocks. Its tied output layer (the vocabulary) stays frozen.

Depends on: config.
"""

from __future__ import annotations

import torch
from torch import nn

from peftflow.config import ModelConfig
from peftflow.errors import ConfigError
from peftflow.models.assets import ResolvedModel
from peftflow.models.attention import ATTENTION
from peftflow.models.backbone import quantized_loading, refuse_random_quantized


def check_generation_knobs(model_cfg: ModelConfig, family: str) -> None:
    """Refuse settings that cannot mean anything for a left-to-right generator."""
    if family != "decoder":
        raise ConfigError(
            f"task 'generation' needs a decoder (causal LM); {model_cfg.name!r} is an "
            f"{family}. Use model.name: smollm2-135m (or gpt2, a hub id, a local folder)"
        )
    if not model_cfg.causal_mask:
        raise ConfigError(
            "model.causal_mask=false applies to classification only: a generator predicts "
            "each token from the ones before it. Remove model.causal_mask"
        )
    if model_cfg.padding_side != "left":
        raise ConfigError("task 'generation' needs model.padding_side: left")


def build_causal_lm(
    resolved: ResolvedModel,
    model_cfg: ModelConfig,
    seed: int = 0,
    quantization: object | None = None,
) -> nn.Module:
    """The base causal LM: pretrained weights, or the same architecture randomly initialised.

    ``quantization``: how the method needs the pretrained weights loaded (QLoRA: 4-bit).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    check_generation_knobs(model_cfg, resolved.family)
    dtype = getattr(torch, model_cfg.dtype)
    if model_cfg.pretrained:
        resolved.require_weights()
        model = AutoModelForCausalLM.from_pretrained(
            resolved.location,
            revision=resolved.revision,
            dtype=dtype,
            attn_implementation=ATTENTION,
            use_safetensors=True,  # never unpickle a .bin checkpoint
            **quantized_loading(quantization),
        )
    else:
        refuse_random_quantized(quantization)
        config = AutoConfig.from_pretrained(resolved.location, revision=resolved.revision)
        torch.manual_seed(seed)  # the random base is a pure function of (architecture, seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTENTION)
    torch.manual_seed(seed)  # new method tensors (adapters, prompts) start from the seed
    return model


def counts_positions_itself(model: nn.Module) -> bool:
    """peft's virtual-token methods number positions themselves and drop ``position_ids``."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if isinstance(model, nn.parallel.DistributedDataParallel):  # a data-parallel replica
        model = model.module
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)
