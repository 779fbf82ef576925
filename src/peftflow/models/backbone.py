"""The pretrained transformer inside every model: loading it, finding its blocks, counting it.

Shared by the two model kinds (:mod:`.classifier`, :mod:`.causal_lm`) and by the methods,
which freeze, wrap or extend parts of it.

Depends on: config.
"""

from __future__ import annotations

import torch
from torch import nn

from peftflow.config import ModelConfig
from peftflow.errors import ConfigError
from peftflow.models.assets import ResolvedModel
from peftflow.models.attention import ATTENTION


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


def load_saved_tokenizer(folder, padding_side: str):
    """The tokenizer saved with a trained model (exactly as it was used in training)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = padding_side
    return tokenizer


def load_backbone(
    resolved: ResolvedModel, dtype: str = "float32", quantization: object | None = None
) -> nn.Module:
    """The bare transformer (no LM/classification head), with SDPA attention.

    ``quantization``: a transformers ``quantization_config`` (QLoRA's 4-bit NF4); the
    weights are then quantised while loading, onto the current GPU.
    """
    from transformers import AutoModel

    resolved.require_weights()
    return AutoModel.from_pretrained(
        resolved.location,
        revision=resolved.revision,
        dtype=getattr(torch, dtype),
        attn_implementation=ATTENTION,
        use_safetensors=True,  # never unpickle a .bin checkpoint (see docs/reliability.md)
        **quantized_loading(quantization),
    )


def quantized_loading(quantization: object | None) -> dict:
    """``from_pretrained`` arguments that load quantised weights (none without quantization).

    The method that asks for quantization has already checked for CUDA
    (``peft_based.require_cuda_for_qlora``); one check, with the install hint.
    """
    if quantization is None:
        return {}
    # bitsandbytes quantises as the weights land on the GPU: all of them on this process's.
    return {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}


def random_backbone(resolved: ResolvedModel, dtype: str, seed: int) -> nn.Module:
    """The same architecture as ``load_backbone``, randomly initialised from ``seed``.

    Seeding makes the random base a pure function of (architecture, seed), so a
    saved model rebuilds exactly the frozen base its adapters were trained on.
    """
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(resolved.location, revision=resolved.revision)
    torch.manual_seed(seed)
    return AutoModel.from_config(config, dtype=getattr(torch, dtype), attn_implementation=ATTENTION)


def backbone_for(
    model_cfg: ModelConfig, resolved: ResolvedModel, seed: int, quantization: object | None = None
) -> nn.Module:
    """Pretrained weights, or the same architecture from ``seed`` (``model.pretrained``)."""
    if model_cfg.pretrained:
        return load_backbone(resolved, model_cfg.dtype, quantization)
    refuse_random_quantized(quantization)
    return random_backbone(resolved, model_cfg.dtype, seed)


def refuse_random_quantized(quantization: object | None) -> None:
    if quantization is not None:
        raise ConfigError(
            "qlora quantises pretrained weights, and model.pretrained: false has none; "
            "use lora for the random-initialisation control"
        )


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] counted over real tokens: 0 at each row's first real token.

    Decoders number positions 0..T-1 by default, so a row left-padded with k pads
    would start at position k: GPT-2's learned position table would read the wrong
    rows. Llama's rotary attention depends only on position differences, so the
    shift cancels in exact arithmetic, but counting from 0 keeps it on the
    positions it was pretrained on. Pads get position 0 (clamped); they are masked.
    """
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


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
