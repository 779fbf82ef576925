"""Batch prediction with a reloaded classifier."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from peftflow.model_io import LoadedClassifier
from peftflow.training import encode, predict_logits


def predict_texts(
    loaded: LoadedClassifier, texts: Sequence[str], batch_size: int = 64
) -> pd.DataFrame:
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
