"""Dropout with a cheaper mask on the CPU: one uniform draw per element, compared to p.

The profile of a CPU training step (docs/performance.md) found ``aten::bernoulli_``, the
mask of every dropout, at 17% of a SmolLM2 LoRA step (peft puts a dropout in front of every
LoRA adapter: 120 calls a step) and 20% of a MiniLM full fine-tuning step (BERT's hidden and
attention-probability dropouts). Torch's CPU ``bernoulli_`` draws serially and slowly (its
vectorised MKL path is taken on Intel CPUs only). Drawing ``torch.rand`` and comparing gives
the same Bernoulli(1 - p) mask law from the same generator (so seeds and resumed runs replay
it) in less time. On GPUs nothing changes: their fused dropout kernel is already fast.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

import torch
from torch import nn


def keep_mask(shape: torch.Size, p: float, device: torch.device | None = None) -> torch.Tensor:
    """Which elements dropout keeps: ``rand >= p``, one float32 uniform per element (24
    random bits, as torch's own bernoulli_ draws them), bool of ``shape``."""
    return torch.rand(shape, dtype=torch.float32, device=device) >= p


def uniform_mask_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout of ``x`` in training: zero each element with probability ``p``, scale the
    rest by 1/(1-p), with the mask of :func:`keep_mask`."""
    return torch.where(keep_mask(x.shape, p, x.device), x, 0.0) * (1.0 / (1.0 - p))


class UniformMaskDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask is ``rand >= p``: keep with probability 1 - p, scale 1/(1-p).

    A subclass, so code that reads ``.p`` (attention dropout rates) or checks
    ``isinstance(m, nn.Dropout)`` sees no difference; it has no parameters, so state
    dicts and saved adapters are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or self.inplace or x.device.type != "cpu":
            return super().forward(x)
        return uniform_mask_dropout(x, self.p)


def use_uniform_mask_dropout(model: nn.Module) -> int:
    """Replace every plain ``nn.Dropout`` in ``model`` by :class:`UniformMaskDropout` (same p,
    same mode); the number replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                swapped = UniformMaskDropout(child.p, child.inplace)
                swapped.train(child.training)
                setattr(parent, name, swapped)
                replaced += 1
    return replaced
