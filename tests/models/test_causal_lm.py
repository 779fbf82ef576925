"""Causal-LM helpers that must see through the training wrappers (DDP, torch.compile)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peftflow.models.causal_lm import counts_positions_itself


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo group of one: enough for DistributedDataParallel to wrap a module."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    torch.distributed.destroy_process_group()


def test_virtual_token_methods_are_seen_through_ddp_and_compile(one_process_group):
    prompt = get_peft_model(
        tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    lora = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=2))
    ddp = torch.nn.parallel.DistributedDataParallel

    for wrap in (lambda m: m, ddp, lambda m: torch.compile(ddp(m))):
        assert counts_positions_itself(wrap(prompt)) is True
        assert counts_positions_itself(wrap(lora)) is False
