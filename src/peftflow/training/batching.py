"""From token-id lists to batches: padding, length-grouped batch order, optimizer steps.

Texts are tokenised once up front (no padding); training batches are padded as
``model.padding`` says (:func:`padding_width`), evaluation batches always to their
own longest.

Depends on: config.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from peftflow.config import ModelConfig


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str, pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the batch's longest (or ``pad_to``): input_ids, attention_mask [B, T]."""
    width = pad_to or max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        input_ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return input_ids, mask


def padding_width(model_cfg: ModelConfig, train_lengths: Sequence[int]) -> int | None:
    """The width of training batches for ``model.padding`` (None: each batch's longest).

    longest: each batch to its own longest; max_length: every batch to
    model.max_length; train_longest: every batch to the longest training example
    (after truncation); none: nothing to pad, as every micro-batch holds one
    example (see ``optimizer_steps``).
    """
    if model_cfg.padding == "max_length":
        return model_cfg.max_length
    if model_cfg.padding == "train_longest":
        return max(train_lengths)
    return None


def batch_order(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """Shuffled batches of example indices, reproducible per (seed, epoch).

    With ``group_by_length``, each "megabatch" of 50 batches is sorted by length
    before being cut, so a batch holds similar lengths and little padding; the
    batches are then shuffled so lengths still vary from step to step.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    if group_by_length:
        mega = batch_size * 50
        order = [
            i
            for start in range(0, len(order), mega)
            for i in sorted(order[start : start + mega], key=lambda j: -lengths[j])
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def optimizer_steps(
    batches: list[list[int]], grad_accum_steps: int, unpadded: bool
) -> list[list[list[int]]]:
    """Group batches into optimizer steps, each a list of micro-batches of example indices.

    A step covers ``grad_accum_steps`` batches. ``unpadded`` (model.padding "none")
    runs each example of those batches alone, so a step still sees
    batch_size * grad_accum_steps examples: the effective batch is unchanged.
    """
    steps = [batches[i : i + grad_accum_steps] for i in range(0, len(batches), grad_accum_steps)]
    if unpadded:
        return [[[i] for batch in step for i in batch] for step in steps]
    return steps
