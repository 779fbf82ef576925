"""QLoRA's wiring: transformers loads the base in 4 bits (BitsAndBytesConfig, NF4), peft's
``prepare_model_for_kbit_training`` prepares it, LoRA goes on top. bitsandbytes' kernels need
CUDA, so on this CPU-only CI the GPU calls are stood in for; the GPU check is in benchmarks/gpu/.
"""

from __future__ import annotations

import sys

import pytest
import torch
import transformers
from peft import PeftModel

from peftflow.config.methods import LoraSettings, QLoraSettings
from peftflow.config.sections import ModelConfig
from peftflow.errors import ConfigError
from peftflow.models import backbone
from peftflow.models.assets import resolve_model
from peftflow.models.classifier import build_classifier
from peftflow.models.methods import peft_based
from peftflow.models.methods.registry import base_quantization


@pytest.fixture
def cuda_checked(monkeypatch):
    """Stands in for a machine with CUDA and bitsandbytes (the method's one check passes)."""
    monkeypatch.setattr(peft_based, "require_cuda_for_qlora", lambda: None)


def test_qlora_loads_its_base_as_nf4_with_double_quantisation_and_bf16_compute(cuda_checked):
    config = base_quantization(QLoraSettings())

    assert isinstance(config, transformers.BitsAndBytesConfig)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert base_quantization(LoraSettings()) is None


def test_the_quantization_reaches_from_pretrained_with_the_gpu_as_target(
    tiny_models, monkeypatch, cuda_checked
):
    seen = {}

    def from_pretrained(location, **kwargs):
        seen.update(kwargs)
        return "the loaded backbone"

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", from_pretrained)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    config = base_quantization(QLoraSettings())

    assert backbone.load_backbone(resolve_model(str(tiny_models["bert"])), quantization=config)
    assert seen["quantization_config"] is config and seen["device_map"] == {"": 3}


def test_without_cuda_the_quantization_is_refused_before_anything_loads(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"qlora needs a CUDA GPU \(bitsandbytes"):
        base_quantization(QLoraSettings())


def test_with_cuda_but_no_bitsandbytes_the_install_hint_comes_first(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if absent
    with pytest.raises(ConfigError, match=r"uv sync --extra gpu"):
        base_quantization(QLoraSettings())


def test_a_quantised_base_without_pretrained_weights_is_refused(tiny_models, cuda_checked):
    resolved = resolve_model(str(tiny_models["bert"]))
    config = base_quantization(QLoraSettings())
    with pytest.raises(ConfigError, match="model.pretrained: false has none"):
        backbone.backbone_for(ModelConfig(pretrained=False), resolved, 0, config)


def test_qlora_prepares_the_4bit_backbone_then_puts_lora_on_top(
    tiny_models, monkeypatch, cuda_checked
):
    prepared = []
    monkeypatch.setattr(
        "peft.prepare_model_for_kbit_training",
        lambda model, use_gradient_checkpointing: prepared.append(
            (model, use_gradient_checkpointing)
        ),
    )
    model = build_classifier(resolve_model(str(tiny_models["bert"])), 2, ModelConfig())

    with pytest.raises(ConfigError, match="base loaded in 4 bits"):
        peft_based.apply_qlora(model, QLoraSettings())

    model.backbone.is_loaded_in_4bit = True  # what transformers' 4-bit loading sets
    wrapped = peft_based.apply_qlora(model, QLoraSettings(r=4))
    assert prepared == [(model.backbone, True)]  # the backbone, with gradient checkpointing
    assert isinstance(wrapped, PeftModel)
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert any("lora_A" in name for name in trainable) and any(
        ".head." in name for name in trainable
    )
