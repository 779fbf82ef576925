"""What the training loop minimises and how it scores an epoch: one :class:`Objective` per task.

The loop (:mod:`.loop`) knows nothing of labels, prompts or metrics: each task builds an
Objective (:mod:`peftflow.task`) and the loop calls it.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Objective:
    """What the loop minimises and how it scores an epoch, for one task.

    ``loss_units(idx)`` is what a step's loss is averaged over (examples for
    classification, target tokens for generation); it is known before any forward
    pass, so micro-batches of any size can be weighted exactly.
    ``summed_loss(model, idx, device)`` is a micro-batch's loss summed over those
    units. ``validate(model)`` returns the epoch's validation metrics, among them
    ``best_metric``.
    """

    lengths: list[int]  # tokens per training example (batch grouping, throughput)
    loss_units: Callable[[Sequence[int]], int]
    summed_loss: Callable[[nn.Module, Sequence[int], torch.device], torch.Tensor]
    validate: Callable[[nn.Module], dict[str, float]]
    best_metric: str
    higher_is_better: bool = True

    def improves(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best
