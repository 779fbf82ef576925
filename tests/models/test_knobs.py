"""Decoder classification knobs: padding strategies and side, causal mask, random init."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from peftflow.config.loading import parse_config
from peftflow.data.encoding import EncodedSplit
from peftflow.errors import ConfigError
from peftflow.models.saved import META_FILE
from peftflow.task.classification import Padding, classification_objective, predict_logits
from peftflow.task.registry import build_for_training, load_trained, save_trained
from peftflow.training import loop as training
from peftflow.training.batching import optimizer_steps, pad_batch
from tests.conftest import train_classifier
from tests.models.test_methods import encoded_table

DECODERS = ("llama", "gpt2")
TEXTS = ["free cash now", "the project meeting moved to friday afternoon", "click"]


def knob_config(
    model_dir, method: str = "full", seed: int = 42, group_by_length: bool = True, **model_fields
):
    return parse_config(
        {
            "name": "knobs",
            "seed": seed,
            "model": {"name": str(model_dir), "max_length": 32, **model_fields},
            "method": {"name": method},
            "train": {
                "epochs": 1,
                "batch_size": 8,
                "lr": 5e-3,
                "warmup_ratio": 0.0,
                "progress": False,
                "group_by_length": group_by_length,
            },
        }
    )


def token_ids(tokenizer, texts=TEXTS) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=32)["input_ids"]


@torch.no_grad()
def logits_of(model, sequences, pad_id: int, side: str) -> torch.Tensor:
    ids, mask = pad_batch(sequences, pad_id, side)
    return model.eval()(ids, mask)


# --- padding side and position ids ---------------------------------------------------------


@pytest.mark.parametrize("causal_mask", [True, False])
@pytest.mark.parametrize("kind", DECODERS)
def test_left_and_right_padded_batches_give_the_same_logits(kind, causal_mask, tiny_models):
    cfg = knob_config(tiny_models[kind], pooling="last", causal_mask=causal_mask)
    model, tokenizer, _ = build_for_training(cfg)
    sequences, pad_id = token_ids(tokenizer), tokenizer.pad_token_id
    left = logits_of(model, sequences, pad_id, "left")
    right = logits_of(model, sequences, pad_id, "right")
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    for row, seq in enumerate(sequences):  # each text alone: no padding at all
        alone = logits_of(model, [seq], pad_id, "left")
        torch.testing.assert_close(left[row : row + 1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_decoders_get_positions_counted_from_the_first_real_token(kind, tiny_models):
    """Llama's rotary attention is shift-invariant, so the logits test alone cannot see this."""
    side = "right" if kind == "bert" else "left"
    model, _, _ = build_for_training(knob_config(tiny_models[kind], padding_side=side))
    seen = {}
    model.backbone.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side=side)
    model.eval()(ids, mask)
    if kind == "bert":  # encoders keep their default positions (right padding only)
        assert seen["position_ids"] is None
    else:
        assert seen["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


@pytest.mark.parametrize(("kind", "side"), [("llama", "left"), ("gpt2", "left"), ("bert", "right")])
def test_evaluation_batches_match_examples_scored_alone(kind, side, tiny_models):
    """predict_logits pads to each batch's longest for every strategy: that must not matter."""
    cfg = knob_config(tiny_models[kind], padding_side=side, padding="max_length")
    model, tokenizer, _ = build_for_training(cfg)
    data = EncodedSplit(token_ids(tokenizer), [0] * len(TEXTS))
    batched = predict_logits(model, data, 64, tokenizer.pad_token_id, side)
    alone = predict_logits(model, data, 1, tokenizer.pad_token_id, side)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_left_padding_on_an_encoder_is_refused(tiny_models):
    with pytest.raises(ConfigError, match="padding_side=left shifts the absolute positions"):
        build_for_training(knob_config(tiny_models["bert"], padding_side="left"))


# --- padding strategies in training --------------------------------------------------------


def record_training_batches(monkeypatch, model) -> tuple[list, list]:
    """Attention masks of every training forward, and the number of optimizer steps."""
    masks, steps = [], []
    model.register_forward_pre_hook(
        lambda module, args: masks.append(args[1].clone()) if module.training else None
    )
    real_step = training._optimizer_step
    monkeypatch.setattr(training, "_optimizer_step", lambda *a: (steps.append(1), real_step(*a))[1])
    return masks, steps


@pytest.mark.parametrize("padding", ["longest", "max_length", "train_longest", "none"])
def test_padding_strategy_sets_the_training_batch_width(padding, tiny_models, monkeypatch):
    cfg = knob_config(tiny_models["gpt2"], padding=padding)
    model, tokenizer, _ = build_for_training(cfg)
    data = encoded_table(cfg, tokenizer, n=20)
    masks, steps = record_training_batches(monkeypatch, model)
    train_classifier(model, data, data, cfg, tokenizer.pad_token_id)

    widths = {mask.shape[1] for mask in masks}
    longest_example = max(len(ids) for ids in data.input_ids)
    assert len(steps) == 3  # 20 examples in batches of 8, whatever the padding
    assert sum(mask.shape[0] for mask in masks) == 20
    if padding == "max_length":
        assert widths == {32}
    elif padding == "train_longest":
        assert widths == {longest_example} and longest_example < 32
    elif padding == "none":
        assert all(mask.shape[0] == 1 and mask.all() for mask in masks)
    else:  # each batch to its own longest: some row of every batch is unpadded
        assert all(mask.all(dim=1).any() for mask in masks) and len(widths) > 1


def test_accumulated_gradient_is_the_mean_over_the_step_whatever_the_micro_batches(
    tiny_models,
):
    """Singles (padding 'none') and uneven batches (8 + 4) both give the 12-example mean."""
    cfg = knob_config(tiny_models["llama"])
    model, tokenizer, _ = build_for_training(cfg)
    model.eval()  # no dropout: the forward is deterministic
    data = encoded_table(cfg, tokenizer, n=12)
    padding = Padding(tokenizer.pad_token_id, "right")

    def gradients_after(backward) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ids, mask, labels = padding.collate(data, range(12))
    expected = gradients_after(
        lambda: torch.nn.functional.cross_entropy(model(ids, mask), labels).backward()
    )
    for unpadded in (False, True):
        (step,) = optimizer_steps([list(range(8)), [8, 9, 10, 11]], 2, unpadded)
        assert len(step) == (12 if unpadded else 2)
        objective = classification_objective(data, data, cfg, tokenizer.pad_token_id)
        accumulate = partial(training._accumulate_gradients, model, objective, step)
        actual = gradients_after(partial(accumulate, torch.device("cpu")))
        for got, want in zip(actual, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


# --- causal mask -----------------------------------------------------------------------------


@pytest.mark.parametrize("causal_mask", [True, False])
@pytest.mark.parametrize("kind", DECODERS)
def test_causal_mask_controls_whether_early_positions_see_later_tokens(
    kind, causal_mask, tiny_models
):
    cfg = knob_config(tiny_models[kind], causal_mask=causal_mask)
    model, tokenizer, _ = build_for_training(cfg)
    first = torch.tensor([token_ids(tokenizer, ["free cash now"])[0]])
    changed = first.clone()
    changed[0, -2] = tokenizer.convert_tokens_to_ids("meeting")
    mask = torch.ones_like(first)
    with torch.no_grad():
        model.eval()
        before = model.backbone(input_ids=first, attention_mask=mask).last_hidden_state[0, 0]
        after = model.backbone(input_ids=changed, attention_mask=mask).last_hidden_state[0, 0]
    assert torch.allclose(before, after) == causal_mask


def test_causal_mask_off_on_an_encoder_is_refused(tiny_models):
    with pytest.raises(
        ConfigError, match="applies to decoder models only; encoders are already bidirectional"
    ):
        build_for_training(knob_config(tiny_models["bert"], causal_mask=False))


# --- random initialisation -------------------------------------------------------------------


def backbone_weight(model) -> torch.Tensor:
    return next(p for n, p in model.named_parameters() if "embed_tokens" in n).detach().clone()


def test_random_init_base_is_seeded_and_differs_from_the_pretrained_one(tiny_models):
    folder = tiny_models["llama"]
    random_a = backbone_weight(build_for_training(knob_config(folder, pretrained=False))[0])
    random_b = backbone_weight(build_for_training(knob_config(folder, pretrained=False))[0])
    other_seed = knob_config(folder, pretrained=False, seed=7)
    random_c = backbone_weight(build_for_training(other_seed)[0])
    pretrained = backbone_weight(build_for_training(knob_config(folder))[0])
    assert torch.equal(random_a, random_b)
    assert not torch.equal(random_a, random_c)
    assert not torch.equal(random_a, pretrained)


@pytest.mark.parametrize("kind", DECODERS)
def test_random_init_bidirectional_lora_reloads_to_identical_logits(kind, tiny_models, tmp_path):
    cfg = knob_config(tiny_models[kind], method="lora", pretrained=False, causal_mask=False)
    model, tokenizer, base = build_for_training(cfg)
    data = encoded_table(cfg, tokenizer, n=16)
    pad_id = tokenizer.pad_token_id
    train_classifier(model, data, data, cfg, pad_id)

    saved = save_trained(model, tokenizer, cfg, base, tmp_path / "model")
    reloaded = load_trained(saved)
    torch.testing.assert_close(
        predict_logits(reloaded.model, data, 64, pad_id, "right"),
        predict_logits(model, data, 64, pad_id, "right"),
        atol=1e-5,
        rtol=0,
    )
    recorded = json.loads((saved / META_FILE).read_text())["base"]
    assert recorded["weights"] == "random-init (seed 42)"
    assert reloaded.model.base_model.model.backbone.config.is_causal is False
