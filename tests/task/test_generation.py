"""Generation on tiny causal LMs: loss masking, batched generation, methods, save/reload."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from peftflow.config.experiment import ExperimentConfig
from peftflow.config.loading import parse_config
from peftflow.config.sections import GenerationConfig
from peftflow.data.prompting import EncodedGeneration, encode_generation, prompt_format
from peftflow.errors import ConfigError
from peftflow.models.backbone import mask_positions
from peftflow.models.methods.registry import METHODS
from peftflow.task.generation import Generation
from peftflow.task.generation_decoding import generate_ids, postprocess
from peftflow.task.generation_loss import (
    IGNORE_INDEX,
    generation_batch,
    generation_objective,
    mean_response_loss,
    summed_response_loss,
)
from peftflow.task.registry import build_for_training, load_trained, save_trained
from peftflow.training.loop import train_model
from tests.conftest import tiny_method

GENERATION_METHODS = sorted(
    name for name, spec in METHODS.items() if "generation" in spec.tasks and not spec.requires_cuda
)
# Refused on purpose (asserted below): no biases in Llama; virtual tokens vs GPT-2's
# learned absolute positions under left padding.
REFUSED = {
    ("llama", "bitfit"): "bias",
    ("gpt2", "prompt_tuning"): "left-padded",
    ("gpt2", "p_tuning"): "left-padded",
}
TEXTS = [
    "meeting moved to friday afternoon",
    "free cash",
    "please review the draft budget report before lunch on monday",
    "hi",
]
RESPONSES = ["meeting moved", "cash", "draft budget report", "hi there team"]


def gen_config(model_dir, method: str = "lora", **sections) -> ExperimentConfig:
    data = {
        "name": "tiny-gen",
        "task": "generation",
        "seed": 3,
        "model": {"name": str(model_dir), "max_length": 48},
        "method": tiny_method(method),
        "train": {"epochs": 1, "batch_size": 4, "lr": 1e-2, "progress": False},
        "generation": {"max_new_tokens": 6, "max_response_tokens": 8, "eval_batch_size": 4},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return parse_config(data)


def encoded(tokenizer, cfg: ExperimentConfig, with_targets: bool = True) -> EncodedGeneration:
    fmt = prompt_format(tokenizer, cfg.generation, cfg.model.max_length)
    return encode_generation(tokenizer, fmt, TEXTS, RESPONSES if with_targets else None)


# --- loss masking ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_labels_mask_every_prompt_and_pad_position(kind, tiny_causal_lms):
    cfg = gen_config(tiny_causal_lms[kind], "full")
    _, tokenizer, _ = build_for_training(cfg)
    data = encoded(tokenizer, cfg)
    ids, mask, labels = generation_batch(data, range(len(data)), tokenizer.pad_token_id)
    for row in range(len(data)):
        n_response = len(data.response_ids[row])
        assert labels[row, -n_response:].tolist() == data.response_ids[row]
        assert (labels[row, :-n_response] == IGNORE_INDEX).all()  # prompt + left pads
        assert ids[row, -n_response:].tolist() == data.response_ids[row]
        assert mask[row].sum() == len(data.prompt_ids[row]) + n_response
        assert mask[row, -1] == 1  # left padding: every row ends in the last column


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_loss_is_the_response_tokens_negative_log_likelihood_only(kind, tiny_causal_lms):
    """Recomputed from a full forward pass: summing prompt tokens too would differ."""
    cfg = gen_config(tiny_causal_lms[kind], "full")
    model, tokenizer, _ = build_for_training(cfg)
    model.eval()
    data = encoded(tokenizer, cfg)
    ids, mask, labels = generation_batch(data, range(len(data)), tokenizer.pad_token_id)
    with torch.no_grad():
        ours = summed_response_loss(model, ids, mask, labels, "fp32")
        logits = model(input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask)).logits
    # token t + 1 is predicted at position t: [B, T-1, V] against [B, T-1]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
    )
    response = labels[:, 1:] != IGNORE_INDEX
    real_prompt = (mask[:, 1:] == 1) & ~response
    torch.testing.assert_close(ours, nll[response].sum(), rtol=1e-5, atol=1e-4)
    assert response.sum() == data.n_target_tokens
    assert nll[real_prompt].sum() > 1.0  # the prompt tokens would have added real loss


def test_response_loss_ignores_what_the_prompt_tokens_are_labelled_elsewhere(tiny_causal_lms):
    """Gradients flow only from response positions: logits at prompt positions get none."""
    cfg = gen_config(tiny_causal_lms["llama"], "full")
    model, tokenizer, _ = build_for_training(cfg)
    model.eval()
    data = encoded(tokenizer, cfg)
    ids, mask, labels = generation_batch(data, range(len(data)), tokenizer.pad_token_id)
    captured = {}

    def keep_logits(module, args, output):
        output.logits.retain_grad()
        captured["logits"] = output.logits

    handle = model.register_forward_hook(keep_logits)
    summed_response_loss(model, ids, mask, labels, "fp32").backward()
    handle.remove()
    grad = captured["logits"].grad  # [B, K+1, V]: the kept columns only
    k = grad.shape[1] - 1
    assert k == max(len(r) for r in data.response_ids)
    predicts_target = labels[:, -k:] != IGNORE_INDEX  # column t predicts t + 1
    per_position = grad[:, :-1].abs().sum(dim=-1)
    assert (per_position[~predicts_target] == 0).all()
    assert (per_position[predicts_target] > 0).all()
    assert (grad[:, -1] == 0).all()  # the last column predicts past the end


# --- batched generation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,method",
    [
        ("llama", "full"),
        ("llama", "lora"),
        ("llama", "prefix_tuning"),
        ("llama", "prompt_tuning"),
        ("llama", "p_tuning"),
        ("gpt2", "full"),
        ("gpt2", "lora"),
        ("gpt2", "prefix_tuning"),
    ],
)
def test_left_padded_batched_generation_equals_one_at_a_time(kind, method, tiny_causal_lms):
    cfg = gen_config(tiny_causal_lms[kind], method)
    model, tokenizer, _ = build_for_training(cfg)
    data = encoded(tokenizer, cfg, with_targets=False)
    assert len({len(p) for p in data.prompt_ids}) > 1  # prompts of different lengths: padding
    end_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    batched = generate_ids(model, data, cfg.generation, end_id, pad_id, precision="fp32")
    singles = cfg.generation.model_copy(update={"eval_batch_size": 1})
    one_by_one = generate_ids(model, data, singles, end_id, pad_id, precision="fp32")
    assert batched == one_by_one
    assert any(len(ids) > 0 for ids in batched)


def test_sampling_is_seeded(tiny_causal_lms):
    cfg = gen_config(tiny_causal_lms["llama"], "lora")
    model, tokenizer, _ = build_for_training(cfg)
    data = encoded(tokenizer, cfg, with_targets=False)
    sampling = GenerationConfig(do_sample=True, temperature=1.5, max_new_tokens=6)
    args = (model, data, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert generate_ids(*args, seed=1) == generate_ids(*args, seed=1)
    assert generate_ids(*args, seed=1) != generate_ids(*args, seed=2)


@pytest.mark.parametrize("method", ["lora", "prefix_tuning"])
def test_beam_search_decodes_within_the_new_token_budget(method, tiny_causal_lms):
    cfg = gen_config(tiny_causal_lms["llama"], method)
    model, tokenizer, _ = build_for_training(cfg)
    data = encoded(tokenizer, cfg, with_targets=False)
    beams = GenerationConfig(num_beams=3, max_new_tokens=5, eval_batch_size=2)
    out = generate_ids(model, data, beams, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert len(out) == len(data) and all(len(ids) <= 5 for ids in out)
    assert tokenizer.eos_token_id not in sum(out, [])  # cut at the end id


def test_postprocess_keeps_the_first_line_and_drops_a_label():
    gen = GenerationConfig()
    assert postprocess("\n Subject: Budget review\nmore text", gen) == "Budget review"
    assert postprocess("subject:   hi", gen) == "hi"
    raw = GenerationConfig(first_line_only=False, strip_prefixes=())
    assert postprocess(" Subject: a\nb ", raw) == "Subject: a\nb"


# --- methods --------------------------------------------------------------------------------


def _matrix():
    for kind in ("llama", "gpt2"):
        for method in GENERATION_METHODS:
            if kind == "gpt2" and method not in (
                "full",
                "lora",
                "bitfit",
                "prefix_tuning",
                "bottleneck_adapter",
                "prompt_tuning",
                "p_tuning",
            ):
                continue  # GPT-2 covers the model-specific paths; Llama covers every method
            yield kind, method


@pytest.mark.parametrize("kind,method", list(_matrix()))
def test_every_generation_method_trains_saves_and_reloads_exactly(
    kind, method, tiny_causal_lms, tmp_path
):
    cfg = gen_config(tiny_causal_lms[kind], method, train={"epochs": 4})
    if (kind, method) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[kind, method]):
            build_for_training(cfg)
        return
    model, tokenizer, base = build_for_training(cfg)
    data = encoded(tokenizer, cfg)
    pad_id = tokenizer.pad_token_id
    before = mean_response_loss(model, data, 4, pad_id, "fp32")
    train_model(model, generation_objective(data, data, cfg, pad_id), cfg, None)
    after = mean_response_loss(model, data, 4, pad_id, "fp32")
    assert after < before, f"{method}: loss {before:.3f} -> {after:.3f}"

    model_dir = save_trained(model, tokenizer, cfg, base, tmp_path / "model")
    prepared = SimpleNamespace(encoded={"test": data}, pad_id=pad_id)
    Generation().verify_reload(model, prepared, model_dir, cfg)  # raises on any logit drift
    reloaded = load_trained(model_dir)
    assert reloaded.task == "generation" and reloaded.labels == []
    prompts = encoded(tokenizer, cfg, with_targets=False)
    args = (cfg.generation, tokenizer.eos_token_id, pad_id)
    assert generate_ids(reloaded.model, prompts, *args) == generate_ids(model, prompts, *args)


def test_causal_lm_methods_leave_the_vocabulary_frozen(tiny_causal_lms):
    cfg = gen_config(tiny_causal_lms["llama"], "lora")
    model, _, _ = build_for_training(cfg)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


# --- refusals -------------------------------------------------------------------------------


def test_generation_config_defaults_and_refusals(tiny_causal_lms, tiny_models):
    cfg = parse_config({"name": "g", "task": "generation"})
    assert (cfg.model.name, cfg.model.padding_side) == ("smollm2-135m", "left")
    assert cfg.tracking.promote_metric == "test_bleu"
    with pytest.raises(ConfigError, match="does not apply to task 'generation'.*valid methods"):
        parse_config({"name": "g", "task": "generation", "method": {"name": "last_layer"}})
    with pytest.raises(ConfigError, match="padding_side: left"):
        parse_config({"name": "g", "task": "generation", "model": {"padding_side": "right"}})
    with pytest.raises(ConfigError, match="'sms' has no targets"):
        parse_config({"name": "g", "task": "generation", "data": {"source": "sms", "path": "x"}})
    with pytest.raises(ConfigError, match="needs a decoder"):
        build_for_training(gen_config(tiny_models["bert"], "lora"))
    with pytest.raises(ConfigError, match="causal_mask=false applies to classification"):
        build_for_training(
            gen_config(tiny_causal_lms["llama"], "lora", model={"causal_mask": False})
        )
