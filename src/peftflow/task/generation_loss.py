"""Generation's training signal: left-padded prompt + response rows, loss on response tokens only.

Batches are left-padded: every row's prompt ends at the same column, so every target
token sits in the last ``K + 1`` columns (K = the batch's longest response) and the LM
head (a [H, V] matmul, V = 49,152 for SmolLM2) runs on those columns only
(``logits_to_keep``), not on the prompt.

Depends on: config, data, models, training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from peftflow.config import ExperimentConfig
from peftflow.data.prompting import EncodedGeneration
from peftflow.models.backbone import mask_positions
from peftflow.models.causal_lm import counts_positions_itself
from peftflow.training.batching import pad_batch, padding_width
from peftflow.training.objective import Objective
from peftflow.training.precision import autocast

IGNORE_INDEX = -100  # label of prompt and pad positions: no loss


def generation_batch(
    data: EncodedGeneration, idx: Sequence[int], pad_id: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompt+response rows: input_ids, attention_mask, labels, all [B, T].

    ``labels`` hold the response ids at their positions and IGNORE_INDEX on the
    prompt and the pads: only response tokens carry loss.
    """
    rows = [data.prompt_ids[i] + data.response_ids[i] for i in idx]
    ids, mask = pad_batch(rows, pad_id, "left", width)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, i in enumerate(idx):
        n = len(data.response_ids[i])
        if n:
            labels[row, -n:] = torch.tensor(data.response_ids[i], dtype=torch.long)
    return ids, mask, labels


def response_logits(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, K, V] at the positions that predict the last K columns, and those targets [B, K].

    The logit at column t predicts the token at t + 1, so the K target columns
    need the K + 1 last logits minus the very last one. K is the longest response.
    """
    k = max(int((labels != IGNORE_INDEX).sum(dim=1).max()), 1)
    # use_cache=False: one forward over whole sequences never reads a KV cache.
    kwargs = {"input_ids": ids, "attention_mask": mask, "logits_to_keep": k + 1, "use_cache": False}
    if not counts_positions_itself(model):
        kwargs["position_ids"] = mask_positions(mask)  # left pads do not shift positions
    logits = model(**kwargs).logits[:, :-1]  # [B, K, V]
    return logits, labels[:, -k:]


def summed_response_loss(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    precision: str,
) -> torch.Tensor:
    """Cross-entropy summed over response tokens only (prompt and pads are ignored)."""
    with autocast(ids.device, precision):
        logits, targets = response_logits(model, ids, mask, labels)
    return nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@torch.inference_mode()
def mean_response_loss(
    model: nn.Module, data: EncodedGeneration, batch_size: int, pad_id: int, precision: str
) -> float:
    """Teacher-forced loss per target token over ``data`` (the validation signal per epoch)."""
    model.eval()
    device = next(model.parameters()).device
    lengths = data.lengths  # a property that builds the list: once, not per comparison
    order = sorted(range(len(data)), key=lengths.__getitem__)
    total = 0.0
    for start in range(0, len(order), batch_size):
        ids, mask, labels = generation_batch(data, order[start : start + batch_size], pad_id)
        total += summed_response_loss(
            model, ids.to(device), mask.to(device), labels.to(device), precision
        ).item()
    return total / max(data.n_target_tokens, 1)


def perplexity(loss_per_token: float) -> float:
    """exp(loss), capped at exp(50) so a diverged model logs a number, not inf."""
    return math.exp(min(loss_per_token, 50.0))


def generation_objective(
    train: EncodedGeneration, val: EncodedGeneration, cfg: ExperimentConfig, pad_id: int
) -> Objective:
    """Response-token cross-entropy, averaged over target tokens; best epoch = lowest val loss."""
    width = padding_width(cfg.model, train.lengths)
    precision = cfg.train.precision

    def summed_loss(model: nn.Module, idx: Sequence[int], device: torch.device) -> torch.Tensor:
        ids, mask, labels = generation_batch(train, idx, pad_id, width)
        return summed_response_loss(
            model, ids.to(device), mask.to(device), labels.to(device), precision
        )

    def validate(model: nn.Module) -> dict[str, float]:
        loss = mean_response_loss(model, val, cfg.train.eval_batch_size, pad_id, precision)
        model.train()
        return {"val_loss": loss, "val_perplexity": perplexity(loss)}

    return Objective(
        lengths=train.lengths,
        loss_units=lambda idx: sum(len(train.response_ids[i]) for i in idx),
        summed_loss=summed_loss,
        validate=validate,
        best_metric="val_loss",
        higher_is_better=False,
    )
