"""The CPU dropout with a uniform-draw mask: same law as nn.Dropout, same seeds, same modules."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from peftflow.models.attention import _attention_with_dropout, cpu_float32_sdpa
from peftflow.models.dropout import (
    UniformMaskDropout,
    uniform_mask_dropout,
    use_uniform_mask_dropout,
)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_the_mask_drops_with_probability_p_and_scales_the_rest(p):
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    out = uniform_mask_dropout(x, p)
    dropped = (out == 0).float().mean().item()
    sigma = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(dropped - p) < 5 * sigma
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / (1 - p)))


def test_a_seed_replays_the_mask_and_bf16_stays_bf16():
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    torch.manual_seed(3)
    first = uniform_mask_dropout(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(uniform_mask_dropout(x, 0.1), first)
    assert first.dtype == torch.bfloat16
    assert not torch.equal(uniform_mask_dropout(x, 0.1), first)  # the generator moved on


def test_every_plain_dropout_is_swapped_keeping_rate_mode_and_state_dict():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.ModuleDict({"a": nn.Dropout(0.05)}))
    model.eval()
    keys = set(model.state_dict())
    assert use_uniform_mask_dropout(model) == 2
    assert isinstance(model[1], UniformMaskDropout) and model[1].p == 0.2
    assert isinstance(model[2]["a"], UniformMaskDropout) and model[2]["a"].p == 0.05
    assert not model[1].training and set(model.state_dict()) == keys
    x = torch.randn(3, 4)
    assert torch.equal(model[1](x), x)  # eval: identity
    model.train()
    assert (model[1](torch.ones(1000)) == 0).any()
    assert use_uniform_mask_dropout(model) == 0  # already swapped


def test_lora_dropouts_of_a_peft_model_are_swapped(tiny_models):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = get_peft_model(
        AutoModel.from_pretrained(tiny_models["llama"]),
        LoraConfig(r=2, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]),
    )
    lora_dropouts = [m for n, m in model.named_modules() if "lora_dropout." in n]
    assert lora_dropouts and use_uniform_mask_dropout(model) >= len(lora_dropouts)
    assert all(
        isinstance(m, UniformMaskDropout) for n, m in model.named_modules() if "lora_dropout." in n
    )


QKV = [torch.randn(2, 4, 7, 8) for _ in range(3)]
BOOL_MASK = torch.rand(2, 1, 7, 7) > 0.3
BOOL_MASK[..., 0] = True  # every query sees a key ...
BOOL_MASK[1, :, 2] = False  # ... but one: a pad row under left padding, zeros as in SDPA


@pytest.mark.parametrize(
    "causal, mask",
    [
        (True, None),
        (False, None),
        (False, BOOL_MASK),
        (False, torch.zeros(2, 1, 7, 7).masked_fill(~BOOL_MASK, float("-inf"))),
        (False, torch.randn(2, 1, 7, 7)),
    ],
    ids=["is_causal", "no-mask", "bool-mask", "zero-inf-mask", "additive-bias"],
)
def test_attention_with_dropout_is_sdpa_math(causal, mask):
    module = types.SimpleNamespace(is_causal=causal)
    expected, _ = sdpa_attention_forward(module, *QKV, mask, dropout=0.0)
    # A rate too small to drop anything: the same attention as SDPA's.
    output, _ = _attention_with_dropout(module, *QKV, mask, dropout=1e-12)
    assert output.shape == (2, 7, 4, 8)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_grouped_query_heads_are_repeated():
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=2)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    expected, _ = sdpa_attention_forward(module, q, k, v, None, dropout=0.0)
    output, _ = _attention_with_dropout(module, q, k, v, None, dropout=1e-12)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_training_attention_dropout_takes_the_uniform_mask_path():
    module = types.SimpleNamespace(is_causal=False)
    q, k, v = (t.bfloat16() for t in QKV)
    torch.manual_seed(1)
    routed, _ = cpu_float32_sdpa(module, q, k, v, None, dropout=0.3)
    torch.manual_seed(1)
    direct, _ = _attention_with_dropout(module, *(t.float() for t in (q, k, v)), None, dropout=0.3)
    assert routed.dtype == torch.bfloat16
    assert torch.equal(routed, direct.bfloat16())
    # Averaged over many masks, dropout leaves the attention's expectation unchanged.
    plain, _ = sdpa_attention_forward(module, *QKV, None, dropout=0.0)
    mean = sum(_attention_with_dropout(module, *QKV, None, dropout=0.3)[0] for _ in range(400))
    torch.testing.assert_close(mean / 400, plain, atol=0.15, rtol=0.0)
