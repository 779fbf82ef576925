"""Pooling and padding: the positions the classifier reads."""

from __future__ import annotations

import pytest
import torch

from peftflow.errors import ConfigError
from peftflow.models.classifier import pool
from peftflow.training.batching import pad_batch

# hidden[b, t] = [b, t] so the pooled vector says which position was read.
HIDDEN = torch.stack(
    [torch.stack([torch.tensor([float(b), float(t)]) for t in range(4)]) for b in range(2)]
)


def test_last_uses_attention_mask_with_right_padding():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert pool(HIDDEN, mask, "last")[:, 1].tolist() == [1.0, 3.0]


def test_last_and_first_with_left_padding():
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert pool(HIDDEN, mask, "last")[:, 1].tolist() == [3.0, 3.0]
    assert pool(HIDDEN, mask, "first")[:, 1].tolist() == [2.0, 1.0]


def test_mean_ignores_padding():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert pool(HIDDEN, mask, "mean")[:, 1].tolist() == [0.5, 1.5]


def test_unknown_pooling_is_rejected():
    with pytest.raises(ConfigError, match="choose last, first or mean"):
        pool(HIDDEN, torch.ones(2, 4, dtype=torch.long), "max")


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch_places_tokens_on_the_requested_side(side):
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side=side)
    if side == "right":
        assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
        assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    else:
        assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
        assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pad_batch_to_fixed_width():
    ids, mask = pad_batch([[1, 2]], pad_id=9, side="right", pad_to=4)
    assert ids.tolist() == [[1, 2, 9, 9]] and mask.tolist() == [[1, 1, 0, 0]]
