"""peft-library methods: what each one trains, prompt handling, AdaLoRA's loop hooks, merging.

The cross-method matrix (build, learn, exact reload) lives in tests/models/test_methods.py.
"""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest
import torch
from peft import PeftModel

from peftflow.config.methods import LastLayerSettings
from peftflow.errors import ConfigError
from peftflow.models.classifier import SequenceClassifier
from peftflow.models.methods.peft_based import (
    adalora_orthogonal_penalty,
    apply_prompt_tuning,
    merge_for_inference,
    require_cuda_for_qlora,
)
from peftflow.models.methods.registry import METHODS, list_methods
from peftflow.task.classification import predict_logits
from peftflow.task.registry import build_for_training
from tests.conftest import train_classifier
from tests.models.test_methods import encoded_table, tiny_config

HEAD = r"head\.(weight|bias)"
PEFT_HEAD = r"base_model\.model\.head\.modules_to_save\.default\.(weight|bias)"
HEAD_ONLY = LastLayerSettings()
PROMPT_ENCODER = r"backbone\.prompt_encoder\.default\."

# Per method: patterns every trainable parameter name must match, each matched at least once.
TRAINS: dict[str, list[str]] = {
    "dora": [
        r".*\.lora_[AB]\.default\.weight",
        r".*\.lora_magnitude_vector\.default\.weight",
        PEFT_HEAD,
    ],
    "adalora": [r".*\.lora_[ABE]\.default", PEFT_HEAD],
    "ia3": [r".*\.ia3_l\.default", PEFT_HEAD],
    "vera": [r".*\.vera_lambda_[bd]\.default", PEFT_HEAD],
    "ln_tuning": [
        r".*(input_layernorm|post_attention_layernorm|norm)\.ln_tuning_layers\.default\.weight",
        PEFT_HEAD,
    ],
    "prompt_tuning": [PROMPT_ENCODER + r"embedding\.weight", HEAD],
    "p_tuning": [PROMPT_ENCODER + r"embedding\.weight", PROMPT_ENCODER + r"mlp_head\..*", HEAD],
    "prefix_tuning": [
        PROMPT_ENCODER + r"embedding\.weight",
        PROMPT_ENCODER + r"transform\..*",
        HEAD,
    ],
}


@pytest.mark.parametrize("method", sorted(TRAINS))
def test_method_trains_only_its_own_parameters(method, tiny_models):
    model, _, _ = build_for_training(tiny_config(tiny_models["llama"], method))
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    patterns = TRAINS[method]
    strays = [name for name in trained if not any(re.fullmatch(pat, name) for pat in patterns)]
    assert not strays, f"{method} trains parameters it should not: {strays}"
    for pattern in patterns:
        assert any(re.fullmatch(pattern, name) for name in trained), f"nothing matches {pattern}"


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_prefixes_reach_every_architectures_attention(kind, tiny_models):
    """Prefix tuning enters through past_key_values: changing it must change the logits."""
    cfg = tiny_config(tiny_models[kind], "prefix_tuning")
    model, tokenizer, _ = build_for_training(cfg)
    data = encoded_table(cfg, tokenizer, n=8)
    before = predict_logits(model, data, 8, tokenizer.pad_token_id, "right")
    with torch.no_grad():
        for param in model.backbone.prompt_encoder.parameters():
            param.add_(torch.randn_like(param))
    after = predict_logits(model, data, 8, tokenizer.pad_token_id, "right")
    assert (before - after).abs().max() > 1e-3


class _PrependingBackbone(torch.nn.Module):
    """Stands in for a prompt-tuned backbone: V huge virtual positions before the text."""

    def __init__(self, n_virtual: int):
        super().__init__()
        self.config = type("Config", (), {"hidden_size": 4})()
        self.n_virtual = n_virtual

    def forward(self, input_ids, attention_mask, **kwargs):
        text = input_ids.unsqueeze(-1).float().expand(-1, -1, 4)  # [B, T, H]
        virtual = torch.full((input_ids.shape[0], self.n_virtual, 4), 1e6)  # [B, V, H]
        return type("Out", (), {"last_hidden_state": torch.cat([virtual, text], dim=1)})()


def test_classifier_pools_text_positions_only_after_virtual_tokens():
    model = SequenceClassifier(_PrependingBackbone(n_virtual=3), num_labels=2, pooling="mean")
    model.eval()
    ids = torch.tensor([[1, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    expected = model.head(torch.full((1, 4), 2.0))  # mean of the 3 real text tokens
    assert torch.allclose(model(ids, mask), expected)


def test_prompt_text_init_starts_from_the_texts_token_embeddings(tiny_models):
    cfg = tiny_config(tiny_models["gpt2"], "prompt_tuning", init="text", num_virtual_tokens=4)
    model, tokenizer, _ = build_for_training(cfg)
    token_ids = tokenizer(cfg.method.init_text)["input_ids"][:4]
    word_embeddings = model.backbone.get_input_embeddings().weight
    prompt = model.backbone.prompt_encoder["default"].embedding.weight
    assert torch.equal(prompt, word_embeddings[token_ids])


def test_prompt_random_init_samples_vocabulary_embeddings(tiny_models):
    model, _, _ = build_for_training(tiny_config(tiny_models["llama"], "prompt_tuning"))
    word_embeddings = model.backbone.get_input_embeddings().weight  # [V_vocab, H]
    prompt = model.backbone.prompt_encoder["default"].embedding.weight  # [20, H]
    distances = torch.cdist(prompt, word_embeddings).min(dim=1).values  # cdist rounds ~1e-4
    assert torch.all(distances < 1e-3), "every virtual token starts as some vocabulary token"


def test_prompt_text_init_needs_to_know_the_tokenizer_location(tiny_models):
    cfg = tiny_config(tiny_models["llama"], "prompt_tuning", init="text")
    model, _, _ = build_for_training(cfg.model_copy(update={"method": HEAD_ONLY}))
    model.backbone.config.name_or_path = ""  # a backbone built in memory, not loaded
    with pytest.raises(ConfigError, match="use method.init='random'"):
        apply_prompt_tuning(model, cfg.method)


def test_training_loop_runs_the_method_hooks(tiny_models, monkeypatch):
    """prepare_training gets the optimizer step count; after_optimizer_step sees every step
    with gradients still present (AdaLoRA scores ranks from them)."""
    calls: dict[str, list] = {"total": [], "steps": []}

    def after_step(model, global_step):
        assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
        calls["steps"].append(global_step)

    recording = dataclasses.replace(
        METHODS["last_layer"],
        prepare_training=lambda model, settings, total: calls["total"].append(total),
        after_optimizer_step=after_step,
    )
    monkeypatch.setitem(METHODS, "last_layer", recording)
    cfg = tiny_config(tiny_models["bert"], "last_layer")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 2})})
    model, tokenizer, _ = build_for_training(cfg)
    train_classifier(model, encoded_table(cfg, tokenizer), encoded_table(cfg, tokenizer, 8), cfg, 0)
    assert calls["total"] == [12]  # 48 examples / batch 8 = 6 steps x 2 epochs
    assert calls["steps"] == list(range(1, 13))


def test_adalora_prunes_ranks_to_the_target_budget(tiny_models):
    cfg = tiny_config(tiny_models["llama"], "adalora", init_r=6, target_r=2, delta_t=1)
    train = cfg.train.model_copy(update={"epochs": 4, "restore_best_epoch": False})
    cfg = cfg.model_copy(update={"train": train})
    model, tokenizer, _ = build_for_training(cfg)
    train_classifier(model, encoded_table(cfg, tokenizer), encoded_table(cfg, tokenizer, 8), cfg, 0)
    schedule = model.peft_config["default"]
    assert (schedule.total_step, schedule.tinit, schedule.tfinal) == (24, 2, 4)
    singular_values = [p for n, p in model.named_parameters() if "lora_E" in n]  # [r, 1] each
    assert len(singular_values) == 8  # q, k, v, o in 2 layers
    kept = sum(int((p != 0).sum()) for p in singular_values)
    assert kept <= 2 * len(singular_values) < 6 * len(singular_values)
    assert schedule.rank_pattern, "peft records which ranks survived"


def test_adalora_penalty_vanishes_for_orthonormal_factors(tiny_models):
    model, _, _ = build_for_training(tiny_config(tiny_models["llama"], "adalora"))
    assert adalora_orthogonal_penalty(model) > 0  # random init is not orthonormal
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:  # [r, in]: orthonormal rows
                param.copy_(torch.linalg.qr(param.T).Q.T)
            elif "lora_B" in name:  # [out, r]: orthonormal columns
                param.copy_(torch.linalg.qr(torch.randn_like(param)).Q)
    assert adalora_orthogonal_penalty(model) < 1e-5


MERGEABLE = sorted(name for name, spec in METHODS.items() if spec.mergeable)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_model_gives_the_same_logits(method, kind, tiny_models):
    cfg = tiny_config(tiny_models[kind], method)
    model, tokenizer, _ = build_for_training(cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # move every adapter away from its identity init
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    data = encoded_table(cfg, tokenizer, n=16)
    adapted = predict_logits(model, data, 16, tokenizer.pad_token_id, "right")
    merged = merge_for_inference(model)
    assert isinstance(merged, SequenceClassifier) and not isinstance(merged, PeftModel)
    assert not any(
        "lora_" in n or "ia3_" in n or "vera_" in n for n, _ in merged.named_parameters()
    )
    assert torch.allclose(
        predict_logits(merged, data, 16, tokenizer.pad_token_id, "right"), adapted, atol=1e-5
    )


def test_prompt_methods_are_not_mergeable(tiny_models):
    assert not METHODS["prompt_tuning"].mergeable
    model, _, _ = build_for_training(tiny_config(tiny_models["llama"], "prompt_tuning"))
    with pytest.raises(ConfigError, match="only methods marked mergeable"):
        merge_for_inference(model)


def test_qlora_without_bitsandbytes_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(ConfigError, match="uv sync --extra gpu"):
        require_cuda_for_qlora()


def test_listing_reports_mergeable_and_cuda_only_methods():
    listing = {entry["name"]: entry for entry in list_methods()}
    assert listing["qlora"]["requires_cuda"] and not listing["lora"]["requires_cuda"]
    assert listing["lora"]["mergeable"] and not listing["prefix_tuning"]["mergeable"]
