"""Causal LMs for task "generation": build, response-only loss, batched generation.

Batches are left-padded: every row's prompt ends at the same column, so (a)
generation continues all rows from the last column, and (b) in training every
target token sits in the last ``K + 1`` columns (K = the batch's longest
response), so the LM head (a [H, V] matmul, V = 49,152 for SmolLM2) runs on
those columns only (``logits_to_keep``), not on the prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from peftflow.assets import ResolvedModel
from peftflow.attention import ATTENTION
from peftflow.config import ExperimentConfig, GenerationConfig, ModelConfig
from peftflow.errors import ConfigError
from peftflow.modeling import mask_positions
from peftflow.prompting import EncodedGeneration, end_token_id
from peftflow.training import Objective, autocast, pad_batch

IGNORE_INDEX = -100  # label of prompt and pad positions: no loss


def check_generation_knobs(model_cfg: ModelConfig, resolved: ResolvedModel) -> None:
    """Refuse settings that cannot mean anything for a left-to-right generator."""
    if resolved.family != "decoder":
        raise ConfigError(
            f"task 'generation' needs a decoder (causal LM); {resolved.name!r} is an "
            f"{resolved.family}. Use model.name: smollm2-135m (or gpt2, a hub id, a local folder)"
        )
    if not model_cfg.causal_mask:
        raise ConfigError(
            "model.causal_mask=false applies to classification only: a generator predicts "
            "each token from the ones before it. Remove model.causal_mask"
        )
    if model_cfg.padding_side != "left":
        raise ConfigError("task 'generation' needs model.padding_side: left")


# Methods that prepend virtual tokens let peft number positions, which is right only with
# right padding; models with learned absolute positions then read the wrong rows for
# left-padded (batched generation) prompts. Rotary models (Llama) are unaffected.
_PREPENDS_VIRTUAL_TOKENS = ("prompt_tuning", "p_tuning")
_ABSOLUTE_POSITION_TYPES = ("gpt2",)


def generates_unbatchably(method: str, model_type: str) -> bool:
    """Whether batched generation of this method x model pair would depend on the padding."""
    return method in _PREPENDS_VIRTUAL_TOKENS and model_type in _ABSOLUTE_POSITION_TYPES


def check_method_fits(method: str, model_type: str) -> None:
    """Refuse method x model pairs whose batched generation would depend on the padding."""
    if generates_unbatchably(method, model_type):
        raise ConfigError(
            f"method {method!r} on {model_type} (learned absolute positions) generates "
            "differently when prompts are left-padded in a batch; use prefix_tuning or lora "
            "with this model, or a rotary model such as smollm2-135m"
        )


def build_causal_lm(resolved: ResolvedModel, model_cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """The base causal LM: pretrained weights, or the same architecture randomly initialised."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_generation_knobs(model_cfg, resolved)
    dtype = getattr(torch, model_cfg.dtype)
    if model_cfg.pretrained:
        resolved.require_weights()
        model = AutoModelForCausalLM.from_pretrained(
            resolved.location,
            revision=resolved.revision,
            dtype=dtype,
            attn_implementation=ATTENTION,
            use_safetensors=True,  # never unpickle a .bin checkpoint
        )
    else:
        config = AutoConfig.from_pretrained(resolved.location, revision=resolved.revision)
        torch.manual_seed(seed)  # the random base is a pure function of (architecture, seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTENTION)
    torch.manual_seed(seed)  # new method tensors (adapters, prompts) start from the seed
    return model


def counts_positions_itself(model: nn.Module) -> bool:
    """peft's virtual-token methods number positions themselves and drop ``position_ids``."""
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)


# --- batches and loss ---------------------------------------------------------------------------


def generation_batch(
    data: EncodedGeneration, idx: Sequence[int], pad_id: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompt+response rows: input_ids, attention_mask, labels, all [B, T].

    ``labels`` hold the response ids at their positions and IGNORE_INDEX on the
    prompt and the pads: only response tokens carry loss.
    """
    rows = [data.prompt_ids[i] + data.response_ids[i] for i in idx]
    ids, mask = pad_batch(rows, pad_id, "left", width)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, i in enumerate(idx):
        n = len(data.response_ids[i])
        if n:
            labels[row, -n:] = torch.tensor(data.response_ids[i], dtype=torch.long)
    return ids, mask, labels


def response_logits(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, K, V] at the positions that predict the last K columns, and those targets [B, K].

    The logit at column t predicts the token at t + 1, so the K target columns
    need the K + 1 last logits minus the very last one. K is the longest response.
    """
    k = max(int((labels != IGNORE_INDEX).sum(dim=1).max()), 1)
    kwargs = {"input_ids": ids, "attention_mask": mask, "logits_to_keep": k + 1}
    if not counts_positions_itself(model):
        kwargs["position_ids"] = mask_positions(mask)  # left pads do not shift positions
    logits = model(**kwargs).logits[:, :-1]  # [B, K, V]
    return logits, labels[:, -k:]


def summed_response_loss(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    precision: str,
) -> torch.Tensor:
    """Cross-entropy summed over response tokens only (prompt and pads are ignored)."""
    with autocast(ids.device, precision):
        logits, targets = response_logits(model, ids, mask, labels)
    return nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@torch.inference_mode()
def mean_response_loss(
    model: nn.Module, data: EncodedGeneration, batch_size: int, pad_id: int, precision: str
) -> float:
    """Teacher-forced loss per target token over ``data`` (the validation signal per epoch)."""
    model.eval()
    device = next(model.parameters()).device
    lengths = data.lengths  # a property that builds the list: once, not per comparison
    order = sorted(range(len(data)), key=lengths.__getitem__)
    total = 0.0
    for start in range(0, len(order), batch_size):
        ids, mask, labels = generation_batch(data, order[start : start + batch_size], pad_id)
        total += summed_response_loss(
            model, ids.to(device), mask.to(device), labels.to(device), precision
        ).item()
    return total / max(data.n_target_tokens, 1)


def perplexity(loss_per_token: float) -> float:
    """exp(loss), capped at exp(50) so a diverged model logs a number, not inf."""
    return math.exp(min(loss_per_token, 50.0))


def generation_objective(
    train: EncodedGeneration, val: EncodedGeneration, cfg: ExperimentConfig, pad_id: int
) -> Objective:
    """Response-token cross-entropy, averaged over target tokens; best epoch = lowest val loss."""
    width = _train_width(cfg, train)
    precision = cfg.train.precision

    def summed_loss(model: nn.Module, idx: Sequence[int], device: torch.device) -> torch.Tensor:
        ids, mask, labels = generation_batch(train, idx, pad_id, width)
        return summed_response_loss(
            model, ids.to(device), mask.to(device), labels.to(device), precision
        )

    def validate(model: nn.Module) -> dict[str, float]:
        loss = mean_response_loss(model, val, cfg.train.eval_batch_size, pad_id, precision)
        model.train()
        return {"val_loss": loss, "val_perplexity": perplexity(loss)}

    return Objective(
        lengths=train.lengths,
        loss_units=lambda idx: sum(len(train.response_ids[i]) for i in idx),
        summed_loss=summed_loss,
        validate=validate,
        best_metric="val_loss",
        higher_is_better=False,
    )


def _train_width(cfg: ExperimentConfig, train: EncodedGeneration) -> int | None:
    """model.padding for generation rows: as for classifiers (see training.train_padding)."""
    if cfg.model.padding == "max_length":
        return cfg.model.max_length
    if cfg.model.padding == "train_longest":
        return max(train.lengths)
    return None


# --- generation -----------------------------------------------------------------------------


def generate_kwargs(gen: GenerationConfig, end_id: int, pad_id: int) -> dict:
    """transformers ``generate`` settings for the configured decoding."""
    kwargs = {
        "max_new_tokens": gen.max_new_tokens,
        "num_beams": gen.num_beams,
        "do_sample": gen.do_sample,
        "eos_token_id": end_id,
        "pad_token_id": pad_id,
    }
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
    return kwargs


@torch.inference_mode()
def generate_ids(
    model: nn.Module,
    data: EncodedGeneration,
    gen: GenerationConfig,
    end_id: int,
    pad_id: int,
    precision: str = "auto",
    seed: int = 0,
) -> list[list[int]]:
    """New token ids per prompt (in input order, cut at the end id), left-padded batches.

    Prompts are sorted by length so a batch holds similar lengths (little padding).
    """
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(seed)  # sampling, when configured, is reproducible
    order = sorted(range(len(data)), key=lambda i: len(data.prompt_ids[i]))
    outputs: dict[int, list[int]] = {}
    kwargs = generate_kwargs(gen, end_id, pad_id)
    for start in range(0, len(order), gen.eval_batch_size):
        idx = order[start : start + gen.eval_batch_size]
        ids, mask = pad_batch([data.prompt_ids[i] for i in idx], pad_id, "left")
        with autocast(device, precision):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for row, i in enumerate(idx):
            outputs[i] = _until_end(out[row, ids.shape[1] :].tolist(), end_id)
    return [outputs[i] for i in range(len(data))]


def _until_end(new_ids: list[int], end_id: int) -> list[int]:
    return new_ids[: new_ids.index(end_id)] if end_id in new_ids else new_ids


def generate_texts(model, tokenizer, data: EncodedGeneration, gen: GenerationConfig, **kw) -> list:
    """Generated strings per prompt (special tokens dropped, whitespace trimmed)."""
    ids = generate_ids(model, data, gen, end_token_id(tokenizer), tokenizer.pad_token_id, **kw)
    return [postprocess(tokenizer.decode(row, skip_special_tokens=True), gen) for row in ids]


def postprocess(text: str, gen: GenerationConfig) -> str:
    """The configured clean-up: first non-empty line, then one leading label removed."""
    text = text.strip()
    if gen.first_line_only:
        text = next((line.strip() for line in text.splitlines() if line.strip()), "")
    for prefix in gen.strip_prefixes:
        if text.lower().startswith(prefix.lower()):
            return text[len(prefix) :].strip()
    return text
