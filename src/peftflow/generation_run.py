"""Generation runs: fine-tune a causal LM, or score the untouched base (zero-shot baseline).

Both generate for the same val/test examples with the same prompt format and
decoding, so a fine-tuned run's metrics and the baseline's line up, and the
fine-tuned run logs its gain over the baseline next to its own numbers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch

from peftflow.causal_lm import (
    generate_texts,
    generation_batch,
    generation_objective,
    mean_response_loss,
    perplexity,
    response_logits,
)
from peftflow.checkpoint import Checkpoints
from peftflow.config import ExperimentConfig
from peftflow.errors import RegistryError
from peftflow.gen_metrics import bleu_signature, generation_metrics, samples_table
from peftflow.model_io import build_base, build_for_training, load_model, save_model
from peftflow.modeling import count_parameters
from peftflow.prompting import EncodedGeneration, PromptFormat, encode_generation, prompt_format
from peftflow.training import pick_device, train_model
from peftflow.training_run import (
    epoch_logger,
    log_base_reference,
    memory_prediction_metrics,
    outcome_metrics,
    outcome_tags,
    predicted_peak_memory_mb,
)

# Validation picks the best epoch by teacher-forced loss (cheap); generation, the costly
# part on a CPU (one forward per new token), scores the test split.
EVAL_SPLITS = ("val", "test")
GENERATED_SPLITS = ("test",)
RELOAD_CHECK_EXAMPLES = 8
RELOAD_ATOL = 1e-4
PREDICTIONS_FILE = "predictions.json"


def encode_splits(
    cfg: ExperimentConfig, tokenizer, splits: dict[str, pd.DataFrame]
) -> tuple[PromptFormat, dict[str, EncodedGeneration]]:
    fmt = prompt_format(tokenizer, cfg.generation, cfg.model.max_length)
    encoded = {
        name: encode_generation(
            tokenizer, fmt, frame["prompt"].tolist(), frame["response"].tolist()
        )
        for name, frame in splits.items()
    }
    return fmt, encoded


def capped_splits(cfg: ExperimentConfig, splits: dict[str, pd.DataFrame]) -> dict:
    """train as is; val and test cut to a seeded sample of generation.max_eval_examples rows."""
    cap = cfg.generation.max_eval_examples
    capped = dict(splits)
    for name in EVAL_SPLITS:
        frame = splits[name]
        if cap is not None and len(frame) > cap:
            frame = frame.sample(n=cap, random_state=cfg.seed).sort_values("id")
        capped[name] = frame.reset_index(drop=True)
    return capped


def generated_frames(splits: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    return {name: splits[name] for name in GENERATED_SPLITS}


def score_generation(model, tokenizer, encoded, frames, cfg: ExperimentConfig):
    """Generate for every eval frame; metrics (prefixed val_/test_) and predictions per split.

    Generation reads only ``prompt_ids`` of ``encoded[name]`` (the same ids with or
    without targets, see prompting.py): nothing of the reference goes in.
    """
    metrics: dict[str, float] = {}
    predictions: dict[str, list[str]] = {}
    for name, frame in frames.items():
        data = encoded[name]
        started = time.perf_counter()
        texts = generate_texts(
            model, tokenizer, data, cfg.generation, precision=cfg.train.precision, seed=cfg.seed
        )
        metrics[f"{name}_generate_seconds"] = time.perf_counter() - started
        metrics.update(generation_metrics(texts, frame["response"].tolist(), prefix=f"{name}_"))
        predictions[name] = texts
    return metrics, predictions


def teacher_forced_metrics(model, encoded, cfg: ExperimentConfig, pad_id: int) -> dict:
    """Loss per target token and perplexity on the full val and test splits."""
    metrics = {}
    for name in EVAL_SPLITS:
        loss = mean_response_loss(
            model, encoded[name], cfg.train.eval_batch_size, pad_id, cfg.train.precision
        )
        metrics[f"{name}_loss"] = loss
        metrics[f"{name}_perplexity"] = perplexity(loss)
    return metrics


def log_scoring(tracker, cfg, fmt, tokenizer, encoded, frames, predictions, baseline=None):
    """Prompt format, decoding settings, BLEU signature and the samples table, on the run."""
    test_prompts = encoded["test"]
    tracker.log_dict(
        {
            "template": fmt.template,
            "text_budget_tokens": fmt.text_budget,
            "example_prompt": tokenizer.decode(test_prompts.prompt_ids[0])
            if len(test_prompts)
            else "",
            "decoding": cfg.generation.model_dump(mode="json"),
        },
        "prompt_format.json",
    )
    tracker.set_tags({"peftflow.bleu_signature": bleu_signature()})
    for name, frame in frames.items():
        table = samples_table(
            frame["prompt"].tolist(),
            frame["response"].tolist(),
            predictions[name],
            baseline_predictions=(baseline or {}).get(name),
            n=cfg.generation.n_logged_samples,
        )
        tracker.log_table(table, f"samples/{name}_samples.json")


def write_predictions(frames, predictions, out_dir: Path) -> Path:
    """ids, references and predictions per split: read back by the fine-tuned runs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        name: {
            "ids": frame["id"].tolist(),
            "references": frame["response"].tolist(),
            "predictions": predictions[name],
        }
        for name, frame in frames.items()
    }
    path = out_dir / PREDICTIONS_FILE
    path.write_text(json.dumps(payload, indent=1))
    return path


def baseline_predictions(baseline: dict | None, frames) -> dict[str, list[str]] | None:
    """The zero-shot predictions for the same rows, when the baseline scored the same rows."""
    path = (baseline or {}).get("predictions_path")
    if not path or not Path(path).is_file():
        return None
    saved = json.loads(Path(path).read_text())
    if any(saved.get(n, {}).get("ids") != frames[n]["id"].tolist() for n in frames):
        return None
    return {name: saved[name]["predictions"] for name in frames}


def run_zero_shot(cfg: ExperimentConfig, splits, tracker, out_dir: Path) -> dict:
    """Score the untouched base model with the run's prompt format and decoding."""
    model, tokenizer, base = build_base(cfg)
    model.to(pick_device(cfg.train.device))
    log_base_reference(tracker, base, cfg)
    splits = capped_splits(cfg, splits)
    fmt, encoded = encode_splits(cfg, tokenizer, {n: splits[n] for n in EVAL_SPLITS})
    frames = generated_frames(splits)
    metrics, predictions = score_generation(model, tokenizer, encoded, frames, cfg)
    metrics.update(teacher_forced_metrics(model, encoded, cfg, tokenizer.pad_token_id))
    tracker.log_metrics(metrics)
    log_scoring(tracker, cfg, fmt, tokenizer, encoded, frames, predictions)
    path = write_predictions(frames, predictions, out_dir)
    tracker.log_artifact(path, "predictions")
    return {"metrics": metrics, "predictions_path": str(path)}


def run_generation_training(
    cfg: ExperimentConfig,
    splits,
    tracker,
    out_dir: Path,
    baseline: dict | None = None,
    checkpoints: Checkpoints | None = None,
) -> dict:
    """Train, generate and score val/test, save and verify the reload, log everything.

    ``checkpoints``: resume from and write training checkpoints (see peftflow.checkpoint).
    """
    model, tokenizer, base = build_for_training(cfg)
    trainable, total = count_parameters(model)
    predicted = predicted_peak_memory_mb(model, cfg)
    log_base_reference(tracker, base, cfg)
    splits = capped_splits(cfg, splits)
    fmt, encoded = encode_splits(cfg, tokenizer, splits)
    pad_id = tokenizer.pad_token_id
    objective = generation_objective(encoded["train"], encoded["val"], cfg, pad_id)
    outcome = train_model(model, objective, cfg, epoch_logger(tracker), checkpoints)
    tracker.set_tags(outcome_tags(outcome))
    frames = generated_frames(splits)
    final, predictions = score_generation(model, tokenizer, encoded, frames, cfg)
    final.update(teacher_forced_metrics(model, encoded, cfg, pad_id))
    final.update(outcome_metrics(trainable, total, outcome))
    final.update(gains_over_baseline(final, baseline))
    tracker.log_metrics(final)
    # Logged, not returned: like peak_memory_mb they vary between processes (RSS on CPU).
    tracker.log_metrics(memory_prediction_metrics(predicted, outcome.peak_memory_mb))
    tracker.log_dict({"history": outcome.history}, "history.json")
    zero_shot = baseline_predictions(baseline, frames)
    log_scoring(tracker, cfg, fmt, tokenizer, encoded, frames, predictions, zero_shot)
    tracker.log_artifact(write_predictions(frames, predictions, out_dir), "predictions")
    model_dir = save_model(model, tokenizer, cfg, base, out_dir / "model")
    verify_generation_reload(model, encoded["test"], model_dir, pad_id, cfg)
    tracker.set_tags({"peftflow.reload_check": "passed"})
    tracker.log_artifact(model_dir, "model_folder")
    return {"metrics": final, "model_dir": str(model_dir), "history": outcome.history}


def gains_over_baseline(metrics: dict[str, float], baseline: dict | None) -> dict[str, float]:
    """zero_shot_<m> and <m>_gain for every test metric the baseline also has."""
    if not baseline:
        return {}
    gains = {}
    for name in ("test_bleu", "test_chrf", "test_rougeL", "test_exact_match"):
        if name in metrics and name in baseline.get("metrics", {}):
            gains[f"zero_shot_{name}"] = baseline["metrics"][name]
            gains[f"{name}_gain"] = metrics[name] - baseline["metrics"][name]
    return gains


def verify_generation_reload(
    model, data: EncodedGeneration, model_dir: Path, pad_id: int, cfg: ExperimentConfig
) -> None:
    """Reload the saved folder from scratch; require identical response logits on test rows."""
    idx = list(range(min(RELOAD_CHECK_EXAMPLES, len(data))))
    device = next(model.parameters()).device
    ids, mask, labels = (t.to(device) for t in generation_batch(data, idx, pad_id))
    reloaded = load_model(model_dir, device=str(device))
    with torch.inference_mode():
        model.eval()
        expected, _ = response_logits(model, ids, mask, labels)
        actual, _ = response_logits(reloaded.model, ids, mask, labels)
    if not torch.allclose(expected, actual, atol=RELOAD_ATOL):
        worst = (expected - actual).abs().max().item()
        raise RegistryError(
            f"saved model {model_dir} reloads with different logits (max diff {worst:.2e}); "
            "it will not be registered"
        )
