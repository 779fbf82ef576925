"""The attention every peftflow model runs: PyTorch SDPA, in float32 on the CPU.

Under bf16 autocast on a CPU, q/k/v arrive in bf16 and torch's CPU SDPA kernels
are slower in bf16 than in float32 (measured on this project's AVX512-BF16 EPYC:
one SmolLM2 layer's masked attention, forward + backward, [8, 9, 128, 64]: about
50 ms in bf16 vs 28 ms in float32). So on the CPU the attention itself is
computed in float32 (more exact too) and its output cast back; the matrix
multiplies around it keep autocast's bf16. On a GPU nothing changes: bf16 flash
kernels are the fast path there.

Registered with transformers' attention and mask interfaces under
:data:`ATTENTION`, so every model built with ``attn_implementation=ATTENTION``
uses it; importing this module registers it.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION = "peftflow_sdpa"


def cpu_float32_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA; on the CPU in float32 with autocast off, q/k/v [B, heads, T, head_dim].

    Autocast is switched off, not only the inputs upcast: CPU autocast lists SDPA
    as a bf16 op and would cast float32 q/k/v (Llama's, after RoPE) down again.
    """
    if query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()  # an additive mask: 0 / -inf, [B, 1, T, S]
    with torch.autocast("cpu", enabled=False):
        output, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return output.to(query.dtype), weights


AttentionInterface.register(ATTENTION, cpu_float32_sdpa)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
