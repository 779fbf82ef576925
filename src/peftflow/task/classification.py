"""Task "classification": label each text, scored by accuracy/precision/recall/F1.

The model is a :class:`~peftflow.models.classifier.SequenceClassifier` over any
backbone; the loss is cross-entropy averaged over examples and the best epoch has the
top validation F1. Evaluation batches are length-sorted and padded to their own
longest: a text's logits do not depend on the padding around it. The baseline is
TF-IDF + logistic regression on the same split.

Depends on: config, data, checks, models, training, evaluation, tracking.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from peftflow.checks.raw_data import validate_raw
from peftflow.checks.report import CheckReport
from peftflow.checks.split_integrity import validate_splits
from peftflow.checks.tokenisation import validate_tokenisation
from peftflow.config import DataConfig, ExperimentConfig, ModelConfig
from peftflow.data import split as splitting
from peftflow.data.encoding import EncodedSplit, encode
from peftflow.errors import RegistryError
from peftflow.evaluation.classification_metrics import (
    classification_metrics,
    confusion,
    plot_confusion,
)
from peftflow.evaluation.test_outputs import ARTIFACT_DIR as TEST_OUTPUTS_DIR
from peftflow.evaluation.test_outputs import ExampleOutputs
from peftflow.evaluation.tfidf_baseline import train_tfidf_baseline
from peftflow.models.assets import ResolvedModel, resolve_model
from peftflow.models.attention import ATTENTION
from peftflow.models.backbone import load_tokenizer
from peftflow.models.classifier import (
    SequenceClassifier,
    check_model_knobs,
    resolve_pooling,
)
from peftflow.models.saved import LoadedModel
from peftflow.task.base import TaskKind
from peftflow.task.inference import classifier_base, classify, predict_logits
from peftflow.task.run import RELOAD_ATOL, reload
from peftflow.tracking.runs import RunTracker
from peftflow.training.batching import pad_batch, padding_width
from peftflow.training.objective import Objective
from peftflow.training.precision import autocast

RELOAD_CHECK_EXAMPLES = 32
EVAL_SPLITS = ("val", "test")


@dataclass(frozen=True)
class ClassificationData:
    """Token ids and label ids per split, and the objective over the train split."""

    encoded: dict[str, EncodedSplit]
    pad_id: int
    objective: Objective
    test: pd.DataFrame | None = None  # ids and texts of the test rows, in encoded order


class Classification(TaskKind):
    name = "classification"
    table_layout = "labelled"
    input_example = "Subject: meeting\n\nSee you at 10 tomorrow."
    logged_check_rows = 16
    summary_columns = (("test acc", "test_accuracy"), ("test F1", "test_f1"))
    baseline_label = "tfidf_logreg (baseline)"
    baseline_run_name = "baseline-tfidf-logreg"

    # --- data ---------------------------------------------------------------------------------

    def raw_report(self, view: pd.DataFrame, data: DataConfig) -> CheckReport:
        return validate_raw(view, data)

    def split(self, view: pd.DataFrame, cfg: ExperimentConfig) -> dict[str, pd.DataFrame]:
        return splitting.split_dataset(view, cfg.data.split, cfg.seed)

    def split_summary(self, splits: dict[str, pd.DataFrame]) -> dict:
        return splitting.split_summary(splits)

    def split_report(self, splits: dict[str, pd.DataFrame]) -> CheckReport:
        return validate_splits(splits)

    def tokenisation_report(self, cfg: ExperimentConfig, splits: dict[str, pd.DataFrame]):
        resolved = resolve_model(cfg.model.name, cfg.model.revision)
        self.check_knobs(cfg.model, resolved.family)  # refuse bad knobs before any training work
        report = validate_tokenisation(
            splits,
            load_tokenizer(resolved, cfg.model.padding_side),
            cfg.model.max_length,
            cfg.model.padding_side,
            cfg.data.labels,
            max_truncation_rate=cfg.model.max_truncation_rate,
        )
        return report, _observed_lengths(report)

    # --- model --------------------------------------------------------------------------------

    def check_knobs(self, model_cfg: ModelConfig, family: str) -> None:
        check_model_knobs(model_cfg, family)

    def build_base(self, base: ResolvedModel, cfg: ExperimentConfig, tokenizer) -> nn.Module:
        return classifier_base(base, cfg, tokenizer)

    def architecture(self, base: ResolvedModel, cfg: ExperimentConfig) -> nn.Module:
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(base.location, revision=base.revision)
        dtype = getattr(torch, cfg.model.dtype)
        backbone = AutoModel.from_config(config, dtype=dtype, attn_implementation=ATTENTION)
        pooling = resolve_pooling(cfg.model, base.family)
        return SequenceClassifier(backbone, len(cfg.data.labels), pooling)

    def labels(self, cfg: ExperimentConfig) -> list[str]:
        return list(cfg.data.labels)

    # --- training and evaluation --------------------------------------------------------------

    def prepare(self, cfg, tokenizer, splits) -> ClassificationData:
        encoded = encode_splits(cfg, tokenizer, splits)
        pad_id = tokenizer.pad_token_id
        objective = classification_objective(encoded["train"], encoded["val"], cfg, pad_id)
        return ClassificationData(encoded, pad_id, objective, splits.get("test"))

    def final_metrics(self, model, tokenizer, data, cfg, tracker, out_dir, baseline=None):
        """Val + test metrics of the final (best-epoch) weights, and their confusion matrices."""
        metrics: dict[str, float] = {}
        for split in EVAL_SPLITS:
            values, predictions = evaluate_split(
                model, data.encoded[split], cfg, data.pad_id, prefix=f"{split}_"
            )
            metrics.update(values)
            _log_confusion(tracker, cfg, split, data.encoded[split].labels, predictions, out_dir)
            if split == "test" and data.test is not None:
                _log_test_outputs(tracker, cfg, data.test, predictions, out_dir)
        return metrics

    def verify_reload(self, model, data, model_dir: Path, cfg: ExperimentConfig) -> None:
        """Reload the saved folder from scratch and require identical logits on test examples."""
        test = data.encoded["test"]
        n = RELOAD_CHECK_EXAMPLES
        sample = EncodedSplit(test.input_ids[:n], test.labels[:n])
        args = (cfg.train.eval_batch_size, data.pad_id, cfg.model.padding_side, cfg.train.precision)
        expected = predict_logits(model, sample, *args)
        reloaded = reload(self, model_dir, device=str(next(model.parameters()).device))
        actual = predict_logits(reloaded.model, sample, *args)
        if not torch.allclose(expected, actual, atol=RELOAD_ATOL):
            worst = (expected - actual).abs().max().item()
            raise RegistryError(
                f"saved model {model_dir} reloads with different logits (max diff {worst:.2e}); "
                "it will not be registered"
            )

    # --- baseline -----------------------------------------------------------------------------

    def baseline_key(self, cfg: ExperimentConfig, data_md5: str) -> str:
        identity = cfg.data.model_dump_json() + str(cfg.seed)
        return f"baseline-tfidf-{hashlib.sha256(identity.encode()).hexdigest()[:12]}-{data_md5}"

    def baseline_tags(self, cfg: ExperimentConfig) -> dict[str, str]:
        return {"peftflow.method": "tfidf_logreg"}

    def run_baseline(self, cfg, splits, tracker: RunTracker, out_dir: Path) -> dict[str, float]:
        """TF-IDF + logistic regression: C chosen on val, test scored once."""
        result = train_tfidf_baseline(splits, cfg.data.labels, cfg.data.positive_label, cfg.seed)
        tracker.log_params({"baseline.C": result.best_c, "baseline.model": "tfidf+logreg"})
        # The same per-example file as a fine-tuned run's: studies compare with it email by email.
        predicted = result.pipeline.predict(splits["test"]["text"].astype(str))
        label_ids = [list(cfg.data.labels).index(label) for label in predicted]
        _log_test_outputs(tracker, cfg, splits["test"], label_ids, out_dir)
        png = out_dir / "confusion_test.png"
        plot_confusion(result.test_confusion, cfg.data.labels, "TF-IDF + LR (test)", png)
        tracker.log_artifact(png, "plots")
        return result.metrics

    # --- serving ------------------------------------------------------------------------------

    def predict(self, loaded: LoadedModel, texts: Sequence[str]) -> pd.DataFrame:
        """One row per text: predicted ``label``, its ``score`` and one ``p_<label>`` per label."""
        return classify(loaded, texts)

    def check_texts(self, test_split: pd.DataFrame) -> list[str]:
        return test_split["text"].astype(str).head(self.logged_check_rows).tolist()


def _observed_lengths(report: CheckReport) -> dict:
    """The truncation expectation already measured every length: reuse its stats."""
    return next(r.observed for r in report.results if "token_lengths" in (r.observed or {}))


def _log_test_outputs(tracker, cfg, test: pd.DataFrame, predictions, out_dir: Path) -> None:
    """Every test example's label and prediction (label names): the gate's paired evidence."""
    labels = list(cfg.data.labels)
    outputs = ExampleOutputs(
        "classification",
        ids=test["id"].astype(str).tolist(),
        inputs=test["text"].astype(str).tolist(),
        references=test["label"].astype(str).tolist(),
        predictions=[labels[i] for i in predictions],
        labels=labels,
        positive_label=cfg.data.positive_label,
    )
    tracker.log_artifact(outputs.write(out_dir / "test_outputs"), TEST_OUTPUTS_DIR)


def _log_confusion(tracker, cfg, split: str, labels: list[int], predictions, out_dir: Path) -> None:
    matrix = confusion(labels, predictions, len(cfg.data.labels))
    png = plot_confusion(
        matrix, cfg.data.labels, f"{cfg.name} ({split})", out_dir / f"confusion_{split}.png"
    )
    tracker.log_artifact(png, "plots")
    tracker.log_dict({"labels": list(cfg.data.labels), "matrix": matrix}, f"confusion_{split}.json")


def encode_splits(
    cfg: ExperimentConfig, tokenizer, splits: dict[str, pd.DataFrame]
) -> dict[str, EncodedSplit]:
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


@dataclass(frozen=True)
class Padding:
    """How token-id lists become a batch: pad id, side, and width (None: the batch's longest)."""

    pad_id: int
    side: str
    width: int | None = None

    def collate(
        self, data: EncodedSplit, idx: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask [B, T] and labels [B] of the examples ``idx``."""
        ids, mask = pad_batch([data.input_ids[i] for i in idx], self.pad_id, self.side, self.width)
        return ids, mask, torch.tensor([data.labels[i] for i in idx], dtype=torch.long)


def train_padding(cfg: ExperimentConfig, train: EncodedSplit, pad_id: int) -> Padding:
    """The padding of training batches for ``model.padding`` (see ``padding_width``)."""
    return Padding(pad_id, cfg.model.padding_side, padding_width(cfg.model, train.lengths))


def classification_objective(
    train: EncodedSplit, val: EncodedSplit, cfg: ExperimentConfig, pad_id: int
) -> Objective:
    """Cross-entropy of the labels, averaged over examples; the best epoch has the top val F1."""
    padding = train_padding(cfg, train, pad_id)
    precision = cfg.train.precision

    def summed_loss(model: nn.Module, idx: Sequence[int], device: torch.device) -> torch.Tensor:
        ids, mask, labels = padding.collate(train, idx)
        with autocast(device, precision):
            logits = model(ids.to(device), mask.to(device))  # [B, C]
        return nn.functional.cross_entropy(logits.float(), labels.to(device), reduction="sum")

    def validate(model: nn.Module) -> dict[str, float]:
        return evaluate_split(model, val, cfg, pad_id, prefix="val_")[0]

    return Objective(
        lengths=train.lengths,
        loss_units=len,
        summed_loss=summed_loss,
        validate=validate,
        best_metric="val_f1",
    )


def evaluate_split(
    model: nn.Module, data: EncodedSplit, cfg: ExperimentConfig, pad_id: int, prefix: str
) -> tuple[dict[str, float], list[int]]:
    logits = predict_logits(
        model, data, cfg.train.eval_batch_size, pad_id, cfg.model.padding_side, cfg.train.precision
    )
    predictions = logits.argmax(dim=-1).tolist()
    positive = cfg.data.labels.index(cfg.data.positive_label)
    return classification_metrics(data.labels, predictions, positive, prefix=prefix), predictions
