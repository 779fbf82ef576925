"""Where and in what precision a model trains: device choice, bf16 autocast, frozen bf16 weights.

Depends on: nothing in peftflow beyond errors.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from peftflow.errors import TrainingError

logger = logging.getLogger("peftflow.training")


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainingError(
            "train.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'"
        )
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a GPU with bf16, or a CPU where oneDNN has
    bf16 kernels (AVX512-BF16 or AMX). Elsewhere bf16 is emulated, measured 6x slower than
    fp32 (an AVX2 EPYC, docs/results.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def autocasts(device: torch.device, precision: str = "auto") -> bool:
    """Whether bf16 autocast is on for ``train.precision`` on ``device``.

    bf16: always; fp32: never; native: wherever bf16 is native (GPUs, AVX512-BF16/AMX
    CPUs); auto: on GPUs with bf16 only (on a CPU, bf16 changes results, so it is opt-in).
    """
    if precision == "native":
        return native_bf16(device)
    if precision == "auto":
        return device.type == "cuda" and native_bf16(device)
    return precision == "bf16"


def warn_if_emulated(device: torch.device, precision: str) -> None:
    """Say so when bf16 was asked for on hardware that only emulates it (slower, same math)."""
    if precision == "bf16" and not native_bf16(device):
        logger.warning(
            "train.precision is bf16, but this %s has no native bf16 (no AVX512-BF16 or AMX): "
            "bf16 is emulated, several times slower than fp32; train.precision: native picks "
            "bf16 only where it is native",
            device.type.upper(),
        )


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast when ``autocasts``; else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocasts(device, precision))


def frozen_matmul_weights(model: nn.Module) -> list[nn.Parameter]:
    """Frozen float32 Linear/Conv1D weights [out, in], except those tied to an embedding."""
    from transformers.pytorch_utils import Conv1D

    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # DoRA also reads its base weight outside the matmul (the column norm), in float32.
    dora = {
        id(m.base_layer.weight)
        for m in model.modules()
        if hasattr(m, "base_layer") and any(getattr(m, "use_dora", {}).values())
    }
    weights = {
        id(m.weight): m.weight
        for m in model.modules()
        if isinstance(m, nn.Linear | Conv1D)
        and not m.weight.requires_grad
        and m.weight.dtype == torch.float32
        and id(m.weight) not in tied | dora
    }
    return list(weights.values())


def store_frozen_weights_for_autocast(model: nn.Module, device: torch.device, precision: str):
    """Under bf16 autocast, keep frozen matmul weights in bf16 once (same math, less work).

    Autocast casts a float32 matmul weight to bf16 on every forward (its cast cache
    keeps only weights that require grad); a frozen weight casts to the same bf16
    values every time, so storing it once computes exactly the same, saves the cast
    (about 6% of a SmolLM2 LoRA step on CPU) and half of that weight's memory.
    Embedding-tied weights (LM heads) stay: embeddings are not autocast.
    """
    if not autocasts(device, precision):
        return
    for weight in frozen_matmul_weights(model):
        weight.data = weight.data.to(torch.bfloat16)


def compiled_for_training(model: nn.Module, compile_model: bool) -> nn.Module:
    """What training forward passes run through: ``model``, or ``torch.compile`` of it.

    Only the training forward uses the compiled wrapper; the optimizer, validation,
    checkpoints and saving keep ``model`` (the wrapper shares its parameters, so state
    dict keys never gain ``_orig_mod.``). ``dynamic=True`` because batches padded to
    their own longest change width from step to step: one graph with a symbolic
    length instead of a recompile per width.
    """
    if not compile_model:
        return model
    return torch.compile(model, dynamic=True)
