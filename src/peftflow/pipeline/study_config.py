"""A study YAML's schema: the study, its variants, its questions and the reference results.

Frozen, strict pydantic models (an unknown key is an error that names it); the plan that
expands them into validated experiment configs is :mod:`peftflow.pipeline.study`.

Depends on: config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from peftflow.config import METHOD_SETTINGS, format_validation_error, read_yaml_mapping
from peftflow.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ReferenceResult(_Frozen):
    """A published result for the same question (the study's ``reference_source``)."""

    label: str = Field(..., min_length=1)
    accuracy: float = Field(..., ge=0.0, le=1.0)


class QuestionSpec(_Frozen):
    """What a question compares: pairs of variants (``[a, b]``: a's F1 minus b's)."""

    question: str = Field(..., min_length=1)
    # Empty: the study cannot answer it (its note says why); the report prints the note.
    compare: tuple[tuple[str, str], ...] = ()
    # Why a pair answers the question, or what confounds it; printed under the answer.
    note: str = ""
    # The reference's results for this question's variants where they are not the variant's
    # own `reference` (e.g. the run the reference varied padding on), by variant name.
    references: dict[str, ReferenceResult] = Field(default_factory=dict)


class VariantSpec(_Frozen):
    name: str = Field(..., min_length=1, pattern=NAME_PATTERN)
    # The question(s) this variant helps answer; the report lists the row under each one, so
    # one run can serve several questions (e.g. the reference decoder) without training twice.
    question: str | tuple[str, ...]
    # Shown next to the row (e.g. a confound the reader must know about).
    note: str = ""
    # Dotted keys (model.pooling) or nested sections; applied after budget and method_overrides.
    overrides: dict[str, Any] = Field(default_factory=dict)
    # The reference's result for the variant it ran that matches this one, if any.
    reference: ReferenceResult | None = None

    @property
    def questions(self) -> tuple[str, ...]:
        return (self.question,) if isinstance(self.question, str) else self.question

    @model_validator(mode="after")
    def _check(self) -> VariantSpec:
        if not self.questions or not all(q.strip() for q in self.questions):
            raise ValueError(f"variant {self.name!r} needs a non-empty `question` (or a list)")
        return self


class StudyConfig(_Frozen):
    name: str = Field(..., min_length=1, pattern=NAME_PATTERN)
    description: str = ""
    # Experiment YAML every variant starts from; relative paths are relative to the study file.
    base: str = Field(..., min_length=1)
    # Applied to every variant (data size, max_length, epochs): the matched budget.
    budget: dict[str, Any] = Field(default_factory=dict)
    # Per-method settings (e.g. lr) applied to every variant that uses that method.
    method_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Add one variant per registry method that applies to the base model here.
    all_methods: bool = False
    variants: tuple[VariantSpec, ...] = ()
    # Variants training at once (each in its own process); None: one per GPU on a host
    # with two or more, else 1. How a study runs, not what it is: not part of its hash.
    max_parallel: int | None = Field(None, ge=1)
    # Training seeds (train.seed): every variant runs once per seed on the one split; empty:
    # once, with the experiment's seed.
    seeds: tuple[int, ...] = ()
    # Train each variant in a fresh process, so its peak memory is its own (a process's
    # peak RSS never falls back). How a study runs: not part of its hash.
    isolate: bool = False
    # The pairs each question compares; a question listed on variants but not here gets
    # no answer line, only its table.
    questions: tuple[QuestionSpec, ...] = ()
    # Where the variants' `reference` results come from (model, data, budget).
    reference_source: str = ""

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        if not self.variants and not self.all_methods:
            raise ValueError("a study needs `variants` or `all_methods: true`; add one")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct; got {list(self.seeds)}")
        names = [variant.name for variant in self.variants]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"variant names must be unique; repeated: {repeated}")
        unknown = sorted(set(self.method_overrides) - set(METHOD_SETTINGS))
        if unknown:
            raise ValueError(
                f"method_overrides names unknown methods {unknown}; "
                f"valid methods: {', '.join(sorted(METHOD_SETTINGS))}"
            )
        self._check_questions(names)
        return self

    def _check_questions(self, names: list[str]) -> None:
        for spec in self.questions:
            unknown = sorted({n for pair in spec.compare for n in pair} - set(names))
            if unknown:
                raise ValueError(
                    f"question {spec.question!r} compares {unknown}, which are not variants of "
                    f"this study; use names from `variants`: {', '.join(names)}"
                )


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML; errors name the field and the fix."""
    path = Path(path)
    data = read_yaml_mapping(path, "study file", "pass a YAML file under configs/studies/")
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as err:
        problems = format_validation_error(err, str(path)).splitlines()[1:]
        raise ConfigError("\n".join([f"invalid study config {path}:", *problems])) from None
