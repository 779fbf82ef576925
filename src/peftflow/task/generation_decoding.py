"""Batched generation: left-padded prompts, configured decoding, and the same clean-up for all.

Prompts are sorted by length so a batch holds similar lengths (little padding); every
row continues from the last column. Every model's output (fine-tuned or zero-shot) is
post-processed the same way.

Depends on: config, data, training.
"""

from __future__ import annotations

import torch
from torch import nn

from peftflow.config import GenerationConfig
from peftflow.data.prompting import EncodedGeneration, end_token_id
from peftflow.training.batching import pad_batch
from peftflow.training.precision import autocast


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
