"""Task "generation": write a response to each prompt (a causal LM), scored by BLEU/chrF/ROUGE.

The ingested table is viewed as (prompt, response) pairs; splits keep every response
group in one split; the loss is on response tokens only (:mod:`.generation_loss`) and
the best epoch has the lowest validation loss. Test rows are generated
(:mod:`.generation_decoding`) and scored. The baseline is the untouched base model
zero-shot, with the same prompt format and decoding, so each fine-tuned run logs its
gain over it and shows both predictions side by side.

Depends on: config, data, checks, models, training, evaluation, tracking.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from peftflow.checks.generation_raw_data import validate_generation_raw
from peftflow.checks.generation_split_leakage import validate_generation_splits
from peftflow.checks.generation_tokenisation import validate_generation_tokenisation
from peftflow.checks.report import CheckReport
from peftflow.config import DataConfig, ExperimentConfig, ModelConfig
from peftflow.data import split as splitting
from peftflow.data.prompting import (
    EncodedGeneration,
    PromptFormat,
    encode_generation,
    prompt_format,
)
from peftflow.data.subjects import generation_examples
from peftflow.errors import RegistryError
from peftflow.evaluation.test_outputs import ARTIFACT_DIR as TEST_OUTPUTS_DIR
from peftflow.evaluation.test_outputs import ExampleOutputs
from peftflow.evaluation.text_metrics import bleu_signature, generation_metrics, samples_table
from peftflow.models.assets import ResolvedModel, resolve_model
from peftflow.models.attention import ATTENTION
from peftflow.models.backbone import load_tokenizer
from peftflow.models.causal_lm import check_generation_knobs
from peftflow.models.saved import LoadedModel
from peftflow.task.base import TaskKind
from peftflow.task.generation_decoding import generate_texts
from peftflow.task.generation_loss import (
    generation_batch,
    generation_objective,
    mean_response_loss,
    perplexity,
    response_logits,
)
from peftflow.task.inference import causal_lm_base, generate, refuse_padding_problem
from peftflow.task.run import RELOAD_ATOL, build_untouched, log_base_reference, reload
from peftflow.tracking.runs import RunTracker
from peftflow.training.objective import Objective
from peftflow.training.precision import autocast

# Validation picks the best epoch by teacher-forced loss (cheap); generation, the costly
# part on a CPU (one forward per new token), scores the test split.
EVAL_SPLITS = ("val", "test")
GENERATED_SPLITS = ("test",)
RELOAD_CHECK_EXAMPLES = 8
PREDICTIONS_FILE = "predictions.json"
GAIN_METRICS = ("test_bleu", "test_chrf", "test_rougeL", "test_exact_match")


@dataclass(frozen=True)
class GenerationData:
    """The capped splits, their prompt/response ids, the prompt format and the objective."""

    frames: dict[str, pd.DataFrame]
    fmt: PromptFormat
    encoded: dict[str, EncodedGeneration]
    pad_id: int
    objective: Objective


class Generation(TaskKind):
    name = "generation"
    table_layout = "pairs"
    input_example = "Hi all, the build server is down until Monday. Sorry!"
    logged_check_rows = 4  # generating is slower than classifying
    summary_columns = (("BLEU", "test_bleu"), ("chrF", "test_chrf"), ("ROUGE-L", "test_rougeL"))
    baseline_label = "zero-shot (baseline)"
    baseline_run_name = "baseline-zero-shot"

    # --- data ---------------------------------------------------------------------------------

    def view(self, table: pd.DataFrame) -> pd.DataFrame:
        """(prompt, response) pairs: an ingested mail corpus becomes body -> subject."""
        return generation_examples(table)

    def raw_report(self, view: pd.DataFrame, data: DataConfig) -> CheckReport:
        return validate_generation_raw(view, data)

    def split(self, view: pd.DataFrame, cfg: ExperimentConfig) -> dict[str, pd.DataFrame]:
        return splitting.split_generation(view, cfg.data.split, cfg.seed)

    def split_summary(self, splits: dict[str, pd.DataFrame]) -> dict:
        return splitting.generation_split_summary(splits)

    def split_report(self, splits: dict[str, pd.DataFrame]) -> CheckReport:
        return validate_generation_splits(splits)

    def tokenisation_report(self, cfg: ExperimentConfig, splits: dict[str, pd.DataFrame]):
        """Prompt + response vs context, truncation, empty targets, the template."""
        from transformers import AutoConfig

        resolved = resolve_model(cfg.model.name, cfg.model.revision)
        model_config = AutoConfig.from_pretrained(resolved.location, revision=resolved.revision)
        self.check_knobs(cfg.model, resolved.family)  # refuse before any training work
        refuse_padding_problem(cfg, model_config.model_type)
        tokenizer = load_tokenizer(resolved, cfg.model.padding_side)
        fmt, encoded = encode_splits(cfg, tokenizer, splits)
        report = validate_generation_tokenisation(
            encoded,
            fmt,
            max_length=cfg.model.max_length,
            max_new_tokens=cfg.generation.max_new_tokens,
            context_length=getattr(model_config, "max_position_embeddings", None),
            max_truncation_rate=cfg.model.max_truncation_rate,
        )
        observed = next(r.observed for r in report.results if "token_lengths" in (r.observed or {}))
        return report, {"template": fmt.template, **observed}

    # --- model --------------------------------------------------------------------------------

    def check_knobs(self, model_cfg: ModelConfig, family: str) -> None:
        check_generation_knobs(model_cfg, family)

    def build_base(self, base: ResolvedModel, cfg: ExperimentConfig, tokenizer) -> nn.Module:
        return causal_lm_base(base, cfg, tokenizer)

    def architecture(self, base: ResolvedModel, cfg: ExperimentConfig) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(base.location, revision=base.revision)
        dtype = getattr(torch, cfg.model.dtype)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTENTION)

    # --- training and evaluation --------------------------------------------------------------

    def prepare(self, cfg, tokenizer, splits) -> GenerationData:
        frames = capped_splits(cfg, splits)
        fmt, encoded = encode_splits(cfg, tokenizer, frames)
        pad_id = tokenizer.pad_token_id
        objective = generation_objective(encoded["train"], encoded["val"], cfg, pad_id)
        return GenerationData(frames, fmt, encoded, pad_id, objective)

    def final_metrics(self, model, tokenizer, data, cfg, tracker, out_dir, baseline=None):
        """Test generations scored, val/test teacher-forced loss, the gain over zero-shot."""
        frames = generated_frames(data.frames)
        metrics, predictions = score_generation(model, tokenizer, data.encoded, frames, cfg)
        metrics.update(teacher_forced_metrics(model, data.encoded, cfg, data.pad_id))
        metrics.update(gains_over_baseline(metrics, baseline))
        zero_shot = saved_predictions(getattr(baseline, "predictions_path", None), frames)
        log_scoring(tracker, cfg, data.fmt, tokenizer, data.encoded, frames, predictions, zero_shot)
        tracker.log_artifact(write_predictions(frames, predictions, out_dir), "predictions")
        test = frames["test"]
        outputs = ExampleOutputs(
            "generation",
            ids=test["id"].astype(str).tolist(),
            inputs=test["prompt"].astype(str).tolist(),
            references=test["response"].astype(str).tolist(),
            predictions=predictions["test"],
        )
        tracker.log_artifact(outputs.write(out_dir / "test_outputs"), TEST_OUTPUTS_DIR)
        return metrics

    def verify_reload(self, model, data, model_dir: Path, cfg: ExperimentConfig) -> None:
        """Reload the saved folder from scratch; require identical response logits on test rows."""
        test = data.encoded["test"]
        idx = list(range(min(RELOAD_CHECK_EXAMPLES, len(test))))
        device = next(model.parameters()).device
        ids, mask, labels = (t.to(device) for t in generation_batch(test, idx, data.pad_id))
        reloaded = reload(self, model_dir, device=str(device))
        # Both under the run's precision: trained weights stored in bf16 for autocast
        # (peftflow.training.precision) compute exactly what autocast casts them to on reload.
        with torch.inference_mode(), autocast(device, cfg.train.precision):
            model.eval()
            expected, _ = response_logits(model, ids, mask, labels)
            actual, _ = response_logits(reloaded.model, ids, mask, labels)
        if not torch.allclose(expected, actual, atol=RELOAD_ATOL):
            worst = (expected - actual).abs().max().item()
            raise RegistryError(
                f"saved model {model_dir} reloads with different logits (max diff {worst:.2e}); "
                "it will not be registered"
            )

    # --- baseline: the untouched model, zero-shot ---------------------------------------------

    def baseline_key(self, cfg: ExperimentConfig, data_md5: str) -> str:
        """Everything the zero-shot scores depend on: data, split, base, prompt, decoding, seed."""
        parts = {
            "data": cfg.data.model_dump(mode="json"),
            "model": cfg.model.model_dump(mode="json"),
            "generation": cfg.generation.model_dump(mode="json"),
            "precision": cfg.train.precision,
            "seed": cfg.seed,
        }
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
        return f"baseline-zero-shot-{digest}-{data_md5}"

    def baseline_params(self, cfg: ExperimentConfig) -> dict:
        return cfg.flat_params()

    def baseline_tags(self, cfg: ExperimentConfig) -> dict[str, str]:
        return {"peftflow.method": "zero_shot", "peftflow.base_model": cfg.model.name}

    def run_baseline(self, cfg, splits, tracker: RunTracker, out_dir: Path) -> dict[str, float]:
        """Score the untouched base model with the run's prompt format and decoding."""
        model, tokenizer, base = build_untouched(self, cfg)
        log_base_reference(tracker, base, cfg)
        capped = capped_splits(cfg, splits)
        fmt, encoded = encode_splits(cfg, tokenizer, {n: capped[n] for n in EVAL_SPLITS})
        frames = generated_frames(capped)
        metrics, predictions = score_generation(model, tokenizer, encoded, frames, cfg)
        metrics.update(teacher_forced_metrics(model, encoded, cfg, tokenizer.pad_token_id))
        tracker.log_metrics(metrics)
        log_scoring(tracker, cfg, fmt, tokenizer, encoded, frames, predictions)
        tracker.log_artifact(write_predictions(frames, predictions, out_dir), "predictions")
        return metrics

    def baseline_predictions(self, out_dir: Path) -> str | None:
        return str(out_dir / PREDICTIONS_FILE)

    # --- serving ------------------------------------------------------------------------------

    def predict(self, loaded: LoadedModel, texts: Sequence[str]) -> pd.DataFrame:
        """One row per input text: the ``generated`` response (the run's prompt and decoding)."""
        return generate(loaded, texts)

    def check_texts(self, test_split: pd.DataFrame) -> list[str]:
        return test_split["prompt"].astype(str).head(self.logged_check_rows).tolist()


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
    without targets, see peftflow.data.prompting): nothing of the reference goes in.
    """
    metrics: dict[str, float] = {}
    predictions: dict[str, list[str]] = {}
    for name, frame in frames.items():
        started = time.perf_counter()
        texts = generate_texts(
            model,
            tokenizer,
            encoded[name],
            cfg.generation,
            precision=cfg.train.precision,
            seed=cfg.training_seed,
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
    example = tokenizer.decode(test_prompts.prompt_ids[0]) if len(test_prompts) else ""
    tracker.log_dict(
        {
            "template": fmt.template,
            "text_budget_tokens": fmt.text_budget,
            "example_prompt": example,
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


def saved_predictions(path: str | None, frames) -> dict[str, list[str]] | None:
    """The zero-shot predictions for the same rows, when the baseline scored the same rows."""
    if not path or not Path(path).is_file():
        return None
    saved = json.loads(Path(path).read_text())
    if any(saved.get(n, {}).get("ids") != frames[n]["id"].tolist() for n in frames):
        return None
    return {name: saved[name]["predictions"] for name in frames}


def gains_over_baseline(metrics: dict[str, float], baseline) -> dict[str, float]:
    """zero_shot_<m> and <m>_gain for every test metric the baseline run also has."""
    scores = getattr(baseline, "metrics", None) or {}
    gains = {}
    for name in GAIN_METRICS:
        if name in metrics and name in scores:
            gains[f"zero_shot_{name}"] = scores[name]
            gains[f"{name}_gain"] = metrics[name] - scores[name]
    return gains
