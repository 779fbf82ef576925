"""Batch prediction with a reloaded model: labels for classifiers, text for generators."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from peftflow.model_io import LoadedModel
from peftflow.training import encode, predict_logits


def predict_texts(loaded: LoadedModel, texts: Sequence[str], batch_size: int = 64) -> pd.DataFrame:
    """One row per text: predicted ``label``, its ``score`` and one ``p_<label>`` per label."""
    config = loaded.config
    encoded = encode(loaded.tokenizer, texts, [0] * len(texts), config.model.max_length)
    logits = predict_logits(
        loaded.model,
        encoded,
        batch_size,
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


def generate_for_texts(loaded: LoadedModel, texts: Sequence[str]) -> pd.DataFrame:
    """One row per input text: the ``generated`` response (the run's prompt and decoding)."""
    from peftflow.causal_lm import generate_texts
    from peftflow.prompting import encode_generation, prompt_format

    config = loaded.config
    fmt = prompt_format(loaded.tokenizer, config.generation, config.model.max_length)
    data = encode_generation(loaded.tokenizer, fmt, list(texts))
    generated = generate_texts(
        loaded.model,
        loaded.tokenizer,
        data,
        config.generation,
        precision=config.train.precision,
        seed=config.seed,
    )
    return pd.DataFrame({"generated": generated})
