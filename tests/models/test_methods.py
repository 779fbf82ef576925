"""Every registry method on tiny BERT, Llama and GPT-2: counts, learning, exact reload."""

from __future__ import annotations

import re
from typing import ClassVar

import pytest
import torch
from peft import PeftModel

from peftflow.config.loading import parse_config
from peftflow.config.methods import FullSettings
from peftflow.data.encoding import EncodedSplit, encode
from peftflow.errors import ConfigError
from peftflow.models.backbone import count_parameters, final_norm, transformer_blocks
from peftflow.models.methods.adapters import adapters
from peftflow.models.methods.registry import METHODS, apply_method, list_methods
from peftflow.task.classification import predict_logits
from peftflow.task.registry import build_for_training, load_trained, save_trained
from tests.conftest import TINY_KINDS, synthetic_spam_table, train_classifier

# Method x model combinations that must be refused at build time, with the message.
REFUSED = {("bitfit", "llama"): "bias terms, but this llama model has none"}

# Prompt tuning's 20 virtual tokens dilute a random tiny decoder's last-token signal: it
# learns steadily, but one epoch (6 steps) is too few to show it on tiny Llama.
EPOCHS = {"prompt_tuning": 3}


def tiny_config(model_dir, method: str, **method_fields):
    return parse_config(
        {
            "name": f"tiny-{method}",
            "model": {"name": str(model_dir), "max_length": 32},
            "method": {"name": method, **method_fields},
            "train": {
                "epochs": 1,
                "batch_size": 8,
                "lr": 5e-3,
                "warmup_ratio": 0.0,
                "progress": False,
            },
        }
    )


def encoded_table(cfg, tokenizer, n: int = 48) -> EncodedSplit:
    table = synthetic_spam_table(n)
    labels = [cfg.data.labels.index(label) for label in table["label"]]
    return encode(tokenizer, table["text"].tolist(), labels, cfg.model.max_length)


def expected_trainable(model, method: str, n_blocks: int = 1) -> int | None:
    """Independent count of what a selective method must train (None: peft decides)."""
    head = sum(p.numel() for p in model.head.parameters())
    if method == "full":
        return count_parameters(model)[1]
    if method == "last_layer":
        return head
    if method in ("last_block", "last_n_blocks"):
        blocks = transformer_blocks(model.backbone)[-n_blocks:]
        norm = final_norm(model.backbone)
        norm_count = sum(p.numel() for p in norm.parameters()) if norm is not None else 0
        return head + sum(p.numel() for p in blocks.parameters()) + norm_count
    if method == "bitfit":
        biases = [p for n, p in model.backbone.named_parameters() if n.endswith(".bias")]
        return head + sum(p.numel() for p in biases)
    if method in ("bottleneck_adapter", "parallel_adapter"):  # default: pfeiffer, one per block
        hidden, bottleneck = model.backbone.config.hidden_size, 64
        assert len(adapters(model)) == len(transformer_blocks(model.backbone))
        return head + len(adapters(model)) * (2 * hidden * bottleneck + bottleneck + hidden)
    return None


def trained_head(model) -> torch.nn.Module:
    """The head that trains: peft's saved copy when peft wraps the whole classifier."""
    if isinstance(model, PeftModel):
        return model.base_model.model.head.modules_to_save["default"]
    return model.head


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_and_reloads_exactly(method, kind, tiny_models, tmp_path):
    cfg = tiny_config(tiny_models[kind], method)
    if (method, kind) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[(method, kind)]):
            build_for_training(cfg)
        return
    if METHODS[method].requires_cuda and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=f"{method} needs a CUDA GPU"):
            build_for_training(cfg)
        return
    model, tokenizer, base = build_for_training(cfg)
    trainable, total = count_parameters(model)
    assert 0 < trainable <= total
    expected = expected_trainable(model.base_model.model if method == "lora" else model, method)
    if expected is not None:
        assert trainable == expected
    else:  # peft methods: adapters/prompts + the head, far fewer than the whole model
        assert trainable < total * 0.5
        assert all(p.requires_grad for p in trained_head(model).parameters())

    data = encoded_table(cfg, tokenizer)
    pad_id = tokenizer.pad_token_id
    before = torch.nn.functional.cross_entropy(
        predict_logits(model, data, 64, pad_id, "right"), torch.tensor(data.labels)
    )
    train_cfg = cfg.train.model_copy(update={"epochs": EPOCHS.get(method, 1)})
    train_classifier(model, data, data, cfg.model_copy(update={"train": train_cfg}), pad_id)
    after = torch.nn.functional.cross_entropy(
        predict_logits(model, data, 64, pad_id, "right"), torch.tensor(data.labels)
    )
    assert after < before, f"{method} on {kind}: loss {before:.4f} -> {after:.4f} did not fall"

    saved = save_trained(model, tokenizer, cfg, base, tmp_path / "model")
    reloaded = load_trained(saved)
    assert torch.allclose(
        predict_logits(model, data, 64, pad_id, "right"),
        predict_logits(reloaded.model, data, 64, pad_id, "right"),
        atol=1e-5,
    )
    assert count_parameters(reloaded.model)[0] == trainable


def test_last_n_blocks_counts_n_blocks(tiny_models):
    cfg = tiny_config(tiny_models["llama"], "last_n_blocks", n_blocks=2)
    model, _, _ = build_for_training(cfg)
    assert count_parameters(model)[0] == expected_trainable(model, "last_n_blocks", n_blocks=2)


def test_last_block_has_no_block_count_and_points_to_last_n_blocks(tiny_models):
    with pytest.raises(ConfigError, match="'n_blocks' is a setting of last_n_blocks"):
        tiny_config(tiny_models["llama"], "last_block", n_blocks=2)


def test_last_n_blocks_rejects_too_many_blocks(tiny_models):
    cfg = tiny_config(tiny_models["bert"], "last_n_blocks", n_blocks=5)
    with pytest.raises(ConfigError, match=r"only 2 blocks; choose 1\.\.2"):
        build_for_training(cfg)


def test_unknown_method_lists_valid_choices():
    with pytest.raises(
        ConfigError, match=re.escape(f"valid methods: {', '.join(sorted(METHODS))}")
    ):
        parse_config({"name": "x", "method": {"name": "loar"}})


def test_apply_method_refuses_unsupported_family(tiny_models):
    cfg = tiny_config(tiny_models["bert"], "full")
    model, _, _ = build_for_training(cfg)

    class DecoderOnlyFull(FullSettings):
        model_families: ClassVar[frozenset[str]] = frozenset({"decoder"})

    with pytest.raises(ConfigError, match="'full' does not apply to encoder models"):
        apply_method(model, DecoderOnlyFull(), "encoder")


def test_listing_is_derived_from_registry():
    listing = list_methods()
    assert [entry["name"] for entry in listing] == list(METHODS)
    assert {"name", "family", "trains", "model_families"} <= set(listing[0])
