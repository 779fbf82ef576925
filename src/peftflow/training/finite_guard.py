"""Stop training at the first non-finite loss or gradient, before the optimizer applies it.

Depends on: nothing in peftflow beyond errors.
"""

from __future__ import annotations

import torch

from peftflow.errors import TrainingError

# Steps between host reads of the deferred finiteness flag on a GPU (see FiniteGuard).
FINITE_SYNC_STEPS = 20


class NonFiniteError(TrainingError):
    """A step's loss or gradient norm was NaN or infinite; the optimizer did not apply it."""


def defers_on(optimizer) -> bool:
    """Whether the check stays on the device: fused AdamW (it takes ``found_inf``) on a GPU.

    On a CPU a host read each step costs nothing, so the check is immediate there even
    though ``make_optimizer`` fuses AdamW on CPUs too.
    """
    first = next(p for group in optimizer.param_groups for p in group["params"])
    return first.device.type == "cuda" and bool(optimizer.defaults.get("fused"))


class FiniteGuard:
    """Stops an epoch at the first optimizer step whose loss or gradient norm is not finite.

    On a CPU every step is checked on the host before ``optimizer.step()`` (a
    ``.item()`` there costs nothing). On a GPU a host read each step would stall the
    kernel queue, so with fused AdamW (``make_optimizer``) the check stays on
    the device: a sticky flag [] is handed to the optimizer as ``found_inf`` (the AMP
    grad-scaler mechanism), so fused AdamW skips the bad step and every later one
    (weights, moments and step counts untouched), and the host reads the flags every
    FINITE_SYNC_STEPS steps, before each checkpoint and at the epoch end, then raises
    naming the first bad step. Methods with an after-step hook (AdaLoRA edits weights
    from the gradients) are checked on the host every step.
    """

    def __init__(self, optimizer, epoch: int, n_steps: int, deferred: bool = True):
        self.optimizer, self.epoch, self.n_steps = optimizer, epoch, n_steps
        self.deferred = deferred and defers_on(optimizer)
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, [2] finite flags) unread
        self.bad: torch.Tensor | None = None  # [] on the device: any bad step so far

    def check(self, loss: torch.Tensor, step: int, norm: torch.Tensor) -> None:
        finite = torch.stack([torch.isfinite(loss), torch.isfinite(norm)])  # [2] bool
        if not self.deferred:
            self._raise_unless_finite(step, finite)
            return
        self.pending.append((step, finite))
        step_bad = (~finite.all()).float()
        self.bad = step_bad if self.bad is None else torch.maximum(self.bad, step_bad)
        self.optimizer.found_inf = self.bad

    def sync(self) -> None:
        """Read the deferred flags (one host sync); raise at the first non-finite step."""
        pending, self.pending = self.pending, []
        if pending:
            flags = torch.stack([finite for _, finite in pending]).cpu()  # [S, 2]
            for (step, _), finite in zip(pending, flags, strict=True):
                self._raise_unless_finite(step, finite)

    def _raise_unless_finite(self, step: int, finite: torch.Tensor) -> None:
        loss_ok, norm_ok = (bool(flag) for flag in finite)
        if loss_ok and norm_ok:
            return
        what = "loss" if not loss_ok else "gradient norm"
        raise NonFiniteError(
            f"non-finite {what} in epoch {self.epoch} at optimizer step {step} of "
            f"{self.n_steps}; training stopped before the optimizer applied it. Lower "
            "train.lr, set train.max_grad_norm (e.g. 1.0), or train in float32 "
            "(model.dtype: float32, train.precision: fp32)"
        )
