"""A trained model's inference, and nothing else: rebuilding a saved folder and predicting.

This is the serving runtime. A logged model carries these modules and what they import
(``peftflow.serving.runtime.RUNTIME_MODULES``) as its MLflow ``code_paths``, so it serves
where peftflow is not installed: no data checks, no DVC, no metrics libraries, no MLflow
tracking, only torch, transformers, peft, pydantic, pandas. The tasks' ``predict`` and
``build_base`` delegate here, so in-process and served predictions are one code path.

Depends on: config, data (encoding, prompting), models, training (batching, precision),
task.generation_decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from peftflow.config import ExperimentConfig
from peftflow.data.encoding import EncodedSplit, encode
from peftflow.data.prompting import encode_generation, prompt_format
from peftflow.errors import ConfigError
from peftflow.models.assets import ResolvedModel
from peftflow.models.causal_lm import build_causal_lm
from peftflow.models.classifier import build_classifier
from peftflow.models.methods.registry import base_quantization, padding_problem
from peftflow.models.saved import LoadedModel, load_model, read_meta
from peftflow.task.generation_decoding import generate_texts
from peftflow.training.batching import pad_batch
from peftflow.training.precision import autocast

PREDICT_BATCH_SIZE = 64


# --- building a task's model before any method ----------------------------------------------


def classifier_base(base: ResolvedModel, cfg: ExperimentConfig, tokenizer) -> nn.Module:
    """A SequenceClassifier over ``base`` with ``cfg``'s labels, pad id as the tokenizer's."""
    model = build_classifier(
        base, len(cfg.data.labels), cfg.model, cfg.training_seed, base_quantization(cfg.method)
    )
    if tokenizer is not None and getattr(model.backbone.config, "pad_token_id", None) is None:
        model.backbone.config.pad_token_id = tokenizer.pad_token_id  # decoders pad with eos
    return model


def causal_lm_base(base: ResolvedModel, cfg: ExperimentConfig, tokenizer) -> nn.Module:
    """The causal LM ``base``; refuses methods whose outputs would shift with left padding."""
    model = build_causal_lm(base, cfg.model, cfg.training_seed, base_quantization(cfg.method))
    refuse_padding_problem(cfg, model.config.model_type)
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoders pad with eos
    return model


def refuse_padding_problem(cfg: ExperimentConfig, model_type: str) -> None:
    """Batched generation left-pads prompts: refuse methods whose outputs would then shift."""
    problem = padding_problem(cfg.method.name, model_type, cfg.model.padding_side)
    if problem:
        raise ConfigError(f"method {cfg.method.name!r} {problem}")


BASE_BUILDERS = {"classification": classifier_base, "generation": causal_lm_base}


def load(model_dir: str | Path, device: str = "cpu") -> LoadedModel:
    """A saved model folder (adapter or merged), rebuilt for the task it was trained for."""
    task = read_meta(model_dir)["task"]
    return load_model(Path(model_dir), BASE_BUILDERS[task], device)


# --- predicting -------------------------------------------------------------------------------


def predict(loaded: LoadedModel, texts: Sequence[str]) -> pd.DataFrame:
    """The task's answer per text: labels and probabilities, or generated text."""
    if loaded.config.task == "generation":
        return generate(loaded, texts)
    return classify(loaded, texts)


def classify(loaded: LoadedModel, texts: Sequence[str]) -> pd.DataFrame:
    """One row per text: predicted ``label``, its ``score`` and one ``p_<label>`` per label."""
    config = loaded.config
    encoded = encode(loaded.tokenizer, texts, [0] * len(texts), config.model.max_length)
    logits = predict_logits(
        loaded.model,
        encoded,
        PREDICT_BATCH_SIZE,
        loaded.tokenizer.pad_token_id,
        config.model.padding_side,
        config.train.precision,
    )
    probs = torch.softmax(logits, dim=-1) if len(texts) else torch.empty(0, len(loaded.labels))
    best = probs.argmax(dim=-1).tolist() if len(texts) else []
    frame = pd.DataFrame(
        {
            "label": [loaded.labels[i] for i in best],
            "score": [float(probs[row, i]) for row, i in enumerate(best)],
        }
    )
    for column, name in enumerate(loaded.labels):
        frame[f"p_{name}"] = probs[:, column].tolist() if len(texts) else []
    return frame


def generate(loaded: LoadedModel, texts: Sequence[str]) -> pd.DataFrame:
    """One row per input text: the ``generated`` response (the run's prompt and decoding)."""
    config = loaded.config
    fmt = prompt_format(loaded.tokenizer, config.generation, config.model.max_length)
    data = encode_generation(loaded.tokenizer, fmt, list(texts))
    generated = generate_texts(
        loaded.model,
        loaded.tokenizer,
        data,
        config.generation,
        precision=config.train.precision,
        seed=config.training_seed,
    )
    return pd.DataFrame({"generated": generated})


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    data: EncodedSplit,
    batch_size: int,
    pad_id: int,
    side: str,
    precision: str = "auto",
) -> torch.Tensor:
    """Logits [N, C] in input order; batches are length-sorted to minimise padding.

    Every ``model.padding`` strategy is evaluated with batches padded to their own
    longest: pads are masked, decoders count positions over real tokens
    (``mask_positions``) and encoders pad on the right (left is refused), so a
    text's logits do not depend on the padding around it and a wider pad would
    only cost compute. tests/test_knobs.py checks this invariance.
    """
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    chunks = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad_batch([data.input_ids[i] for i in idx], pad_id, side)
        with autocast(device, precision):
            chunks.append(model(ids.to(device), mask.to(device)).float().cpu())
    logits = torch.cat(chunks) if chunks else torch.empty(0)
    restored = torch.empty_like(logits)
    restored[torch.tensor(order, dtype=torch.long)] = logits
    return restored
