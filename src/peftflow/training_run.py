"""One fine-tuning run: build, train, evaluate, save, verify the reload, log everything."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from peftflow.allocator import loaded_allocator
from peftflow.checkpoint import Checkpoints
from peftflow.config import ExperimentConfig
from peftflow.errors import RegistryError
from peftflow.metrics import confusion, plot_confusion
from peftflow.model_io import (
    base_reference,
    build_for_training,
    load_model,
    save_model,
)
from peftflow.modeling import count_parameters
from peftflow.training import (
    EncodedSplit,
    TrainOutcome,
    encode,
    evaluate_split,
    predict_logits,
    train_classifier,
)

RELOAD_CHECK_EXAMPLES = 32
RELOAD_ATOL = 1e-4


def encode_splits(cfg: ExperimentConfig, tokenizer, splits: dict[str, pd.DataFrame]):
    label_ids = {name: i for i, name in enumerate(cfg.data.labels)}
    return {
        name: encode(
            tokenizer,
            frame["text"].tolist(),
            [label_ids[label] for label in frame["label"]],
            cfg.model.max_length,
        )
        for name, frame in splits.items()
    }


def run_training(
    cfg: ExperimentConfig,
    splits: dict[str, pd.DataFrame],
    tracker,
    out_dir: Path,
    checkpoints: Checkpoints | None = None,
) -> dict:
    """Everything between 'data is checked' and 'model folder verified', logged to ``tracker``.

    ``checkpoints``: resume from and write training checkpoints (see peftflow.checkpoint).
    """
    model, tokenizer, base = build_for_training(cfg)
    trainable, total = count_parameters(model)
    predicted = predicted_peak_memory_mb(model, cfg)
    log_base_reference(tracker, base, cfg)
    encoded = encode_splits(cfg, tokenizer, splits)
    pad_id = tokenizer.pad_token_id
    log_epoch = epoch_logger(tracker)
    outcome = train_classifier(
        model, encoded["train"], encoded["val"], cfg, pad_id, log_epoch, checkpoints
    )
    tracker.set_tags(outcome_tags(outcome))
    final = _final_metrics(model, encoded, cfg, pad_id, out_dir, tracker)
    final.update(outcome_metrics(trainable, total, outcome))
    tracker.log_metrics(final)
    # Logged, not returned: like peak_memory_mb they vary between processes (RSS on CPU).
    tracker.log_metrics(memory_prediction_metrics(predicted, outcome.peak_memory_mb))
    tracker.log_dict({"history": outcome.history}, "history.json")
    model_dir = save_model(model, tokenizer, cfg, base, out_dir / "model")
    verify_reload(model, encoded["test"], model_dir, pad_id, cfg)
    tracker.set_tags({"peftflow.reload_check": "passed"})
    tracker.log_artifact(model_dir, "model_folder")
    return {"metrics": final, "model_dir": str(model_dir), "history": outcome.history}


def log_base_reference(tracker, base, cfg: ExperimentConfig) -> None:
    """Where the base weights came from, pinned by fingerprint (tags) and location (params)."""
    tracker.set_tags(
        {
            "peftflow.base_fingerprint": base.fingerprint,
            "peftflow.base_source": base.source,
            "peftflow.base_weights": base_reference(base, cfg)["weights"],
            "peftflow.base_revision": base.pinned_revision(),
        }
    )
    tracker.log_params({"base.location": base.location, "base.package": base.package_version or ""})


def epoch_logger(tracker):
    """Curves live under epoch/...; the un-prefixed names hold the final (best-epoch) values."""

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics({f"epoch/{k}": v for k, v in metrics.items() if k != "epoch"}, epoch)

    return log_epoch


def outcome_tags(outcome: TrainOutcome) -> dict[str, str]:
    """Where a run trained: the device, and the C allocator, which decides how far a CPU
    run's RSS (``peak_memory_mb``) exceeds its live memory (docs/memory.md)."""
    return {"peftflow.device": outcome.device, "peftflow.allocator": loaded_allocator()}


def outcome_metrics(trainable: int, total: int, outcome: TrainOutcome) -> dict[str, float]:
    """Size, speed and memory of a training run: the same names for every task."""
    return {
        "trainable_params": float(trainable),
        "total_params": float(total),
        "trainable_percent": 100.0 * trainable / total,
        "train_seconds": outcome.train_seconds,
        "train_examples_per_second": outcome.examples_per_second,
        "train_tokens_per_second": outcome.tokens_per_second,
        "peak_memory_mb": outcome.peak_memory_mb,
        "best_epoch": float(outcome.best_epoch),
    }


def predicted_peak_memory_mb(model, cfg: ExperimentConfig) -> float:
    """peftflow.estimate's prediction for the built model, before it trains (MiB).

    On CPU the measured peak is the process's peak RSS, so the runtime term is what the
    process holds now (libraries, data, tokenizer) less the model's weights, which
    the estimate counts itself; on CUDA both sides count tensors only.
    """
    from peftflow.estimate import estimate_device, estimate_for_model, runtime_baseline_bytes

    runtime = runtime_baseline_bytes(estimate_device(cfg))
    if runtime:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        runtime = max(runtime - weights, 0.0)
    return estimate_for_model(model, cfg, runtime_bytes=runtime).total_mb


def memory_prediction_metrics(predicted_mb: float, measured_mb: float) -> dict[str, float]:
    """Predicted peak memory next to the measured ``peak_memory_mb``, and their ratio."""
    return {
        "predicted_peak_memory_mb": predicted_mb,
        "peak_memory_predicted_over_measured": predicted_mb / measured_mb if measured_mb else 0.0,
    }


def _final_metrics(model, encoded, cfg, pad_id, out_dir: Path, tracker) -> dict[str, float]:
    """Val + test metrics of the final (best-epoch) weights, and test/val confusion PNGs."""
    metrics: dict[str, float] = {}
    for split in ("val", "test"):
        values, predictions = evaluate_split(model, encoded[split], cfg, pad_id, prefix=f"{split}_")
        metrics.update(values)
        matrix = confusion(encoded[split].labels, predictions, len(cfg.data.labels))
        png = plot_confusion(
            matrix, cfg.data.labels, f"{cfg.name} ({split})", out_dir / f"confusion_{split}.png"
        )
        tracker.log_artifact(png, "plots")
        tracker.log_dict(
            {"labels": list(cfg.data.labels), "matrix": matrix}, f"confusion_{split}.json"
        )
    return metrics


def verify_reload(
    model, data: EncodedSplit, model_dir: Path, pad_id: int, cfg: ExperimentConfig
) -> None:
    """Reload the saved folder from scratch and require identical logits on test examples."""
    sample = EncodedSplit(
        data.input_ids[:RELOAD_CHECK_EXAMPLES], data.labels[:RELOAD_CHECK_EXAMPLES]
    )
    args = (cfg.train.eval_batch_size, pad_id, cfg.model.padding_side, cfg.train.precision)
    expected = predict_logits(model, sample, *args)
    reloaded = load_model(model_dir, device=str(next(model.parameters()).device))
    actual = predict_logits(reloaded.model, sample, *args)
    if not torch.allclose(expected, actual, atol=RELOAD_ATOL):
        worst = (expected - actual).abs().max().item()
        raise RegistryError(
            f"saved model {model_dir} reloads with different logits (max diff {worst:.2e}); "
            "it will not be registered"
        )
