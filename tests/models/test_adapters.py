"""Module-surgery methods: BitFit and bottleneck / parallel / Mix-and-Match adapters."""

from __future__ import annotations

import pytest
import torch

from peftflow.config import METHOD_SETTINGS
from peftflow.errors import ConfigError
from peftflow.models.backbone import count_parameters, transformer_blocks
from peftflow.models.methods.adapters import (
    ParallelAdapter,
    ParallelAdapterBeforeResidual,
    SerialAdapter,
    adapters,
    apply_bottleneck_adapter,
    apply_parallel_adapter,
)
from peftflow.models.methods.registry import METHODS
from peftflow.models.methods.selective import apply_bitfit
from peftflow.task.registry import build_for_training
from tests.conftest import TINY_KINDS
from tests.models.test_methods import tiny_config

BOTTLENECK = 8
# variant -> (method, placement)
ADAPTER_METHODS = {
    "houlsby": ("bottleneck_adapter", "houlsby"),
    "pfeiffer": ("bottleneck_adapter", "pfeiffer"),
    "parallel": ("parallel_adapter", "pfeiffer"),
}


def base_and_method_config(model_dir, method: str, placement: str = "pfeiffer"):
    """A plain classifier (method "full", nothing inserted) and the method config to apply."""
    wanted = {"bottleneck": BOTTLENECK, "placement": placement}
    fields = METHOD_SETTINGS[method].model_fields
    method_cfg = tiny_config(model_dir, method, **{k: v for k, v in wanted.items() if k in fields})
    method_cfg = method_cfg.method
    model, tokenizer, _ = build_for_training(tiny_config(model_dir, "full"))
    return model.eval(), tokenizer, method_cfg


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(
        ["win free cash now", "team meeting notes"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"])  # [2, num_labels]


def adapter_size(hidden: int) -> int:
    return 2 * hidden * BOTTLENECK + BOTTLENECK + hidden


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("variant", sorted(ADAPTER_METHODS))
def test_adapters_start_as_identity_and_sit_in_the_forward_path(variant, kind, tiny_models):
    name, placement = ADAPTER_METHODS[variant]
    model, tokenizer, method = base_and_method_config(tiny_models[kind], name, placement)
    before = logits(model, tokenizer)
    METHODS[name].apply(model, method)
    assert torch.equal(logits(model.eval(), tokenizer), before)

    for adapter in adapters(model):  # a trained (non-zero) up-projection changes the output
        torch.nn.init.normal_(adapter.up.weight, std=0.5)
    assert not torch.allclose(logits(model, tokenizer), before, atol=1e-4)


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("variant", sorted(ADAPTER_METHODS))
def test_trainable_count_is_adapters_plus_head(variant, kind, tiny_models):
    name, placement = ADAPTER_METHODS[variant]
    model, _, method = base_and_method_config(tiny_models[kind], name, placement)
    METHODS[name].apply(model, method)
    n_blocks = len(transformer_blocks(model.backbone))
    per_block = 2 if variant == "houlsby" else 1
    head = sum(p.numel() for p in model.head.parameters())
    expected = n_blocks * per_block * adapter_size(model.backbone.config.hidden_size) + head
    assert count_parameters(model)[0] == expected
    frozen_outside = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and ".adapter." not in name and not name.startswith("head.")
    ]
    assert frozen_outside == []


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_houlsby_adds_attention_adapters_to_pfeiffer_mlp_adapters(kind, tiny_models):
    counts = {}
    for placement in ("houlsby", "pfeiffer"):
        model, _, method = base_and_method_config(
            tiny_models[kind], "bottleneck_adapter", placement
        )
        apply_bottleneck_adapter(model, method)
        counts[placement] = len(adapters(model))
        assert all(isinstance(m, SerialAdapter) for m in model.modules() if hasattr(m, "adapter"))
    n_blocks = len(transformer_blocks(model.backbone))
    assert counts == {"houlsby": 2 * n_blocks, "pfeiffer": n_blocks}


def test_parallel_adapter_adds_the_scaled_branch_to_the_mlp_output(tiny_models):
    model, _, method = base_and_method_config(tiny_models["llama"], "parallel_adapter")
    mlp = transformer_blocks(model.backbone)[0].mlp
    apply_parallel_adapter(model, method)
    wrapped = transformer_blocks(model.backbone)[0].mlp
    assert isinstance(wrapped, ParallelAdapter) and wrapped.mlp is mlp
    torch.nn.init.normal_(wrapped.adapter.up.weight)
    x = torch.randn(2, 5, model.backbone.config.hidden_size)  # [B, T, H]
    with torch.no_grad():
        expected = mlp(x) + method.scaling * wrapped.adapter(x)
        assert torch.allclose(wrapped(x), expected)


def test_bert_parallel_adapter_joins_the_mlp_output_before_residual_and_norm(tiny_models):
    model, _, method = base_and_method_config(tiny_models["bert"], "parallel_adapter")
    apply_parallel_adapter(model, method)
    wrapped = transformer_blocks(model.backbone)[0].output
    assert isinstance(wrapped, ParallelAdapterBeforeResidual)
    torch.nn.init.normal_(wrapped.adapter.up.weight)
    bert_output = wrapped.mlp_output  # LayerNorm(dropout(dense(h)) + x), in eval mode
    h = torch.randn(2, 5, model.backbone.config.intermediate_size)  # MLP hidden [B, T, 4H]
    x = torch.randn(2, 5, model.backbone.config.hidden_size)  # MLP input [B, T, H]
    with torch.no_grad():
        mlp_out = bert_output.dense(h) + method.scaling * wrapped.adapter(x)
        assert torch.allclose(wrapped(h, x), bert_output.LayerNorm(mlp_out + x), atol=1e-6)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_bitfit_trains_exactly_the_biases_and_the_head(kind, tiny_models):
    model, tokenizer, method = base_and_method_config(tiny_models[kind], "bitfit")
    apply_bitfit(model, method)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    biases = {f"backbone.{n}" for n, _ in model.backbone.named_parameters() if n.endswith(".bias")}
    assert biases and trained == biases | {"head.weight", "head.bias"}


def test_bitfit_refuses_bias_free_llama_and_names_alternatives(tiny_models):
    model, _, method = base_and_method_config(tiny_models["llama"], "bitfit")
    with pytest.raises(ConfigError, match="has none.*bias-free.*use ln_tuning.*or lora"):
        apply_bitfit(model, method)
    assert all(p.requires_grad for p in model.parameters())  # refused before any change


def test_unknown_architecture_is_refused_with_the_supported_types(tiny_models):
    model, _, method = base_and_method_config(tiny_models["gpt2"], "bottleneck_adapter")
    model.backbone.config.model_type = "mystery"
    with pytest.raises(ConfigError, match="model type 'mystery'.*supports bert, gpt2, llama"):
        apply_bottleneck_adapter(model, method)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_mam_trains_prefix_and_parallel_adapters_and_head_only(kind, tiny_models):
    cfg = tiny_config(
        tiny_models[kind],
        "mam_adapter",
        bottleneck=BOTTLENECK,
        num_virtual_tokens=4,
        encoder_hidden_size=16,
    )
    model, _, _ = build_for_training(cfg)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    adapter_names = [n for n in trained if ".adapter." in n]
    prefix_names = [n for n in trained if n.startswith("backbone.prompt_encoder.")]
    assert len(adapter_names) == 4 * len(transformer_blocks(model.backbone.base_model))
    assert prefix_names and {"head.weight", "head.bias"} <= set(trained)
    assert set(trained) == set(adapter_names) | set(prefix_names) | {"head.weight", "head.bias"}
