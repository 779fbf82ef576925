"""The one typed, frozen experiment config, its hash and its run key.

A run is fully described by an :class:`ExperimentConfig`. Its canonical hash
(sorted-key JSON of every field, defaults included, except the few in
``RUN_KEY_EXCLUDED`` that never change a result) plus the DVC md5 of the data
is the *run key*: recorded as an MLflow tag and used as the cache key. The
``method`` section holds only the chosen method's settings, so they alone are hashed.

Depends on: nothing in peftflow beyond errors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from peftflow.config.methods import METHOD_SETTINGS, LoraSettings, MethodConfig, merges_into_base
from peftflow.config.sections import (
    DataConfig,
    Frozen,
    GenerationConfig,
    ModelConfig,
    TrackingConfig,
    TrainConfig,
)

Task = Literal["classification", "generation"]

# What each task needs unless the config says otherwise (applied under the config's own
# values). A generator must pad on the left: a batch's prompts then end where generation starts.
TASK_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "classification": {},
    "generation": {
        "model": {"name": "smollm2-135m", "padding_side": "left", "max_length": 256},
        "tracking": {
            "experiment": "peftflow-subjects",
            "model_name": "subject-generator",
            "promote_metric": "test_bleu",
        },
    },
}
# Data sources that hold no target for a task, with what to use instead.
TASK_REFUSED_SOURCES: dict[str, dict[str, str]] = {
    "classification": {},
    "generation": {
        "sms": "use 'spamassassin' (subject lines) or 'table' with "
        "data.prompt_column/data.response_column",
    },
}
# Model knobs a task fixes: (field, required value, why).
TASK_REQUIRED_MODEL: dict[str, tuple[tuple[str, Any, str], ...]] = {
    "classification": (),
    "generation": (
        (
            "padding_side",
            "left",
            "prompts must end where generation starts in a batch",
        ),
    ),
}


def default_promote_metric(task: str) -> str:
    """The metric a task's runs are promoted and ranked on (test_f1, test_bleu)."""
    tracking = TASK_DEFAULTS.get(task, {}).get("tracking", {})
    return tracking.get("promote_metric", TrackingConfig.model_fields["promote_metric"].default)


class ExperimentConfig(Frozen):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    # classification: label each text; generation: generate a response (causal LM).
    task: Task = "classification"
    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=LoraSettings)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """A task's defaults apply under whatever the config sets itself."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        for section, defaults in TASK_DEFAULTS.get(data.get("task"), {}).items():
            given = data.get(section)
            if given is None or isinstance(given, Mapping):
                data[section] = {**defaults, **(given or {})}
        return data

    @model_validator(mode="after")
    def _task_fits(self) -> ExperimentConfig:
        if self.task not in type(self.method).tasks:
            valid = sorted(name for name, s in METHOD_SETTINGS.items() if self.task in s.tasks)
            raise ValueError(
                f"method {self.method.name!r} does not apply to task {self.task!r}; "
                f"valid methods: {', '.join(valid)}"
            )
        instead = TASK_REFUSED_SOURCES[self.task].get(self.data.source)
        if instead:
            raise ValueError(
                f"data.source {self.data.source!r} has no targets for task {self.task!r}; {instead}"
            )
        for field, value, why in TASK_REQUIRED_MODEL[self.task]:
            if getattr(self.model, field) != value:
                raise ValueError(f"task {self.task!r} needs model.{field}: {value} ({why})")
        if self.tracking.model_format == "merged" and not merges_into_base(self.method):
            raise ValueError(
                f"tracking.model_format: merged needs a method whose weights fold into the "
                f"base; {self.method.name!r} adds modules. Use tracking.model_format: adapter"
            )
        return self

    @property
    def training_seed(self) -> int:
        """The seed of initialisation, batch order and dropout (``seed`` fixes the split)."""
        return self.seed if self.train.seed is None else self.train.seed

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


# The promotion (and ranking) metric of each task's runs.
TASK_METRICS: dict[str, str] = {task: default_promote_metric(task) for task in TASK_DEFAULTS}

# Fields that do not change what a run computes, so not part of its config hash (and run
# key): a checkpointed run resumes whatever its checkpoint cadence, and a data-parallel run
# keeps the key of the one-process run it equals up to float summation order.
RUN_KEY_EXCLUDED: dict[str, set[str]] = {
    "train": {"checkpoint_every_steps", "devices"},
    # How the trained model is logged and judged, never what it is.
    "tracking": {
        "model_format",
        "promote_confidence",
        "promote_resamples",
        "promote_min_test_examples",
    },
}
# Fields added after runs were keyed that can change a result: hashed only when set away
# from their default, so every config written before them keeps its key.
RUN_KEY_OMITTED_AT_DEFAULT: dict[str, dict[str, Any]] = {
    "train": {"compile": False, "seed": None, "max_examples": None},
    "model": {"head_dropout": 0.1},
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
