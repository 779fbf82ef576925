"""Texts to token ids for classification: tokenised once, unpadded, truncated to max_length.

(Generation's prompt + response encoding is :mod:`.prompting`.)

Depends on: nothing in peftflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class EncodedSplit:
    """Token ids per example (unpadded, truncated) and integer labels."""

    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> list[int]:
        """Tokens per example (batch grouping, throughput)."""
        return [len(ids) for ids in self.input_ids]

    @property
    def n_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


def encode(tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int) -> EncodedSplit:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return EncodedSplit([list(ids) for ids in encoded["input_ids"]], list(labels))
