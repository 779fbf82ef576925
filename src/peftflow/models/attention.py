"""The attention every peftflow model runs: PyTorch SDPA, in float32 on the CPU.

Under bf16 autocast on a CPU, q/k/v arrive in bf16 and torch's CPU SDPA kernels
are slower in bf16 than in float32 (measured on this project's AVX512-BF16 EPYC:
one SmolLM2 layer's masked attention, forward + backward, [8, 9, 128, 64]: about
50 ms in bf16 vs 28 ms in float32). So on the CPU the attention itself is
computed in float32 (more exact too) and its output cast back; the matrix
multiplies around it keep autocast's bf16. On a GPU nothing changes: bf16 flash
kernels are the fast path there.

With attention dropout in training (BERT's, GPT-2's attention_probs dropout), torch's CPU
SDPA leaves its fused kernel for the math path and masks the probabilities with the
serial ``bernoulli_``, 20% of a MiniLM step (docs/performance.md). That case computes the
same math here, softmax(q k^T * scale + mask), dropout, @ v, with the cheaper mask draw of
:func:`peftflow.models.dropout.keep_mask`.

Registered with transformers' attention and mask interfaces under
:data:`ATTENTION`, so every model built with ``attn_implementation=ATTENTION``
uses it; importing this module registers it.

Depends on: models.dropout.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from peftflow.models.dropout import keep_mask

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
        q, k, v = query.float(), key.float(), value.float()
        if kwargs.get("dropout", 0.0) > 0.0 and _plain(kwargs):
            output, weights = _attention_with_dropout(module, q, k, v, attention_mask, **kwargs)
        else:
            output, weights = sdpa_attention_forward(module, q, k, v, attention_mask, **kwargs)
    return output.to(query.dtype), weights


def _plain(kwargs: dict) -> bool:
    """No position bias, paged cache or soft-capping: what the dropout path computes."""
    return all(kwargs.get(name) is None for name in ("position_bias", "cache", "softcap"))


def _attention_with_dropout(
    module, query, key, value, attention_mask, dropout, scaling=None, is_causal=None, **_
):
    """softmax(q k^T * scale + mask) -> dropout -> @ v; q [B, h, T, d], k/v [B, h_kv, S, d].

    The math of SDPA's math path (the one torch takes with dropout on a CPU), masked with
    :func:`keep_mask`. Returns [B, T, h, d] as transformers' SDPA forward does. Work on the
    [B, h, T, S] scores is what costs, so the scale goes on q (as SDPA's math path does) and
    the dropout's 1/(1-p) on the [B, h, T, d] output.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query * scale, key.transpose(-1, -2))  # [B, h, T, S]
    if attention_mask is not None and attention_mask.is_floating_point():
        scores = scores + attention_mask  # an additive mask or bias, [B or 1, 1, T, S]
        mask = attention_mask > float("-inf")
    else:
        mask = _boolean_mask(module, attention_mask, is_causal, query.shape[2], key.shape[2])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    sees_a_key = None if mask is None else mask.any(dim=-1, keepdim=True)  # [.., T, 1]
    if sees_a_key is not None and not sees_a_key.all():
        # A query that sees no key (a pad row under left padding) gets zeros, not NaN, as
        # in SDPA's math path (torch's _safe_softmax).
        probs = probs.masked_fill(~sees_a_key, 0.0)
    probs = torch.where(keep_mask(probs.shape, dropout, probs.device), probs, 0.0)
    output = torch.matmul(probs, value) * (1.0 / (1.0 - dropout))  # [B, h, T, d]
    return output.transpose(1, 2).contiguous(), None


def _boolean_mask(module, attention_mask, is_causal, t: int, s: int) -> torch.Tensor | None:
    """Which keys each query sees, True = attend, [B or 1, 1, T, S] or [T, S]; None: all.

    A boolean mask as given; no mask and a causal module: SDPA's is_causal, aligned to the
    top left.
    """
    if attention_mask is not None:
        return attention_mask
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if causal and t > 1:
        return torch.ones(t, s, dtype=torch.bool).tril()
    return None


AttentionInterface.register(ATTENTION, cpu_float32_sdpa)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
