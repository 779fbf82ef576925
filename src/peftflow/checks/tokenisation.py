"""Suite ``tokenisation`` (classification): truncation rate, pad token, padding side, labels.

The length statistics it measures are reused as the stage's observed token lengths.

Depends on: nothing in peftflow beyond checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from peftflow.checks.common import describe_lengths, labels_per_split_batch, require_split_columns
from peftflow.checks.engine import Batch, Check, run_suite
from peftflow.checks.report import CheckReport

_TOKENISE_BATCH = 256


def validate_tokenisation(
    splits: dict[str, pd.DataFrame],
    tokenizer: Any,
    max_length: int,
    padding_side: str,
    labels: Sequence[str],
    max_truncation_rate: float = 0.5,
) -> CheckReport:
    """Suite ``tokenisation``: truncation rate, pad token, padding side, labels per split."""
    require_split_columns(splits, ("id", "text", "label"))
    lengths = _token_length_table(splits, tokenizer)
    return run_suite(
        "tokenisation",
        [
            Batch(
                "token_lengths",
                lengths,
                "id",
                [_truncation_check(lengths, max_length, max_truncation_rate)],
            ),
            Batch("tokenizer", _tokenizer_table(tokenizer), None, _tokenizer_checks(padding_side)),
            labels_per_split_batch(splits, labels),
        ],
    )


def token_length_stats(
    splits: dict[str, pd.DataFrame], tokenizer: Any
) -> dict[str, dict[str, float]]:
    """Per split: count, mean, p50/p90/p99 and max tokens (special tokens included)."""
    return _length_stats(_token_length_table(splits, tokenizer))


def _token_length_table(splits: dict[str, pd.DataFrame], tokenizer: Any) -> pd.DataFrame:
    frames = [
        pd.DataFrame(
            {
                "split": name,
                "id": frame["id"].astype(str).to_numpy(),
                "n_tokens": _token_lengths(frame["text"].astype(str).tolist(), tokenizer),
            }
        )
        for name, frame in splits.items()
    ]
    columns = ["split", "id", "n_tokens"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _token_lengths(texts: list[str], tokenizer: Any) -> np.ndarray:
    """Untruncated, unpadded lengths as the model would see them (special tokens included)."""
    lengths: list[int] = []
    for start in range(0, len(texts), _TOKENISE_BATCH):
        encoded = tokenizer(texts[start : start + _TOKENISE_BATCH], padding=False, truncation=False)
        lengths.extend(len(ids) for ids in encoded["input_ids"])
    return np.asarray(lengths, dtype=np.int64)


def _length_stats(lengths: pd.DataFrame) -> dict[str, dict[str, float]]:
    return {
        str(name): describe_lengths(group["n_tokens"].to_numpy())
        for name, group in lengths.groupby("split", sort=False)
    }


def _truncation_check(lengths: pd.DataFrame, max_length: int, max_rate: float) -> Check:
    from great_expectations import expectations as gxe

    too_long = lengths["n_tokens"] > max_length
    rates = too_long.groupby(lengths["split"], sort=False).mean().round(4).to_dict()
    return Check(
        gxe.ExpectColumnValuesToBeBetween(
            column="n_tokens",
            max_value=max_length,
            mostly=1.0 - max_rate,
            description=(
                f"at most {max_rate:.0%} of texts to exceed max_length={max_length} tokens "
                "(longer ones lose their end to truncation)"
            ),
        ),
        fix=(
            "raise model.max_length (costs memory and time) or accept more truncation; "
            "the examples are ids of over-long texts"
        ),
        observed={
            "max_length": max_length,
            "truncation_rate": rates,
            "token_lengths": _length_stats(lengths),
        },
    )


def _tokenizer_table(tokenizer: Any) -> pd.DataFrame:
    return pd.DataFrame(
        {"pad_token": [tokenizer.pad_token], "padding_side": [tokenizer.padding_side]},
        dtype=object,
    )


def _tokenizer_checks(padding_side: str) -> list[Check]:
    from great_expectations import expectations as gxe

    return [
        Check(
            gxe.ExpectColumnValuesToNotBeNull(
                column="pad_token", description="the tokenizer to define a pad token"
            ),
            fix=(
                "set tokenizer.pad_token before batching (GPT-style models: "
                "tokenizer.pad_token = tokenizer.eos_token) and the model's pad_token_id"
            ),
        ),
        Check(
            gxe.ExpectColumnValuesToBeInSet(
                column="padding_side",
                value_set=[padding_side],
                description=f"the tokenizer to pad on the {padding_side} (model.padding_side)",
            ),
            fix=(
                f"load the tokenizer with padding_side={padding_side!r}, "
                "or change model.padding_side"
            ),
        ),
    ]
