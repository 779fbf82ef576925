"""Studies: one base experiment swept over named variants, each answering a question.

A study YAML names a base experiment, budget overrides applied to every
variant (so the variants are comparable), optional per-method overrides (a
learning rate suits a method, not a study) and the variants themselves. Every
variant is validated as an :class:`~peftflow.config.ExperimentConfig` before
anything runs, so a typo in the last variant fails the study in a second, not
after an hour of training. All variants share one ingest, one split and one set
of data checks, so they must agree on ``data``, ``seed`` and ``tracking``.

With ``all_methods: true`` the study adds one variant per registry method (at
the same budget) that applies to the base model on this machine; a variant
whose config equals an explicit one is not trained twice.

With ``seeds`` every variant runs once per seed (``train.seed``: initialisation, batch
order, dropout) on the one split, and ``questions`` name the pairs of variants each
question compares (:mod:`peftflow.pipeline.study_evidence` scores them).

Depends on: config, models, tracking, task (and pipeline.study_config, its schema).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from peftflow.config import (
    METHOD_SETTINGS,
    ExperimentConfig,
    dotted,
    load_config,
)
from peftflow.errors import ConfigError
from peftflow.models.facts import model_facts
from peftflow.pipeline.study_config import (
    ReferenceResult,
    StudyConfig,
    VariantSpec,
    load_study,
)
from peftflow.task.preflight import method_problem, preflight
from peftflow.tracking.runs import (
    RunResult,
    RunTracker,
    ensure_experiment,
    resolve_tracking_uri,
    standard_tags,
)

# The fields a study shares across variants: one split, one set of checks, one MLflow experiment.
SHARED_FIELDS = ("data", "seed", "tracking")
# Studies compare classifiers: their report ranks F1 and accuracy.
REPORTED_TASK = "classification"
# What each variant reports (MLflow metric names of a classification run).
REPORT_METRICS = (
    "test_accuracy",
    "test_f1",
    "trainable_percent",
    "trainable_params",
    "train_seconds",
    "train_examples_per_second",
    "peak_memory_mb",
    "predicted_peak_memory_mb",
    "run_seconds",
)


@dataclass(frozen=True)
class StudyVariant:
    """One validated run of a study."""

    name: str  # the group's name plus its seed (``minilm-full-seed1``) when the study has seeds
    questions: tuple[str, ...]  # empty: added by all_methods, shown only in the methods table
    note: str
    overrides: dict[str, Any]  # the variant's own dotted overrides, shown in the report
    config: ExperimentConfig
    in_methods_table: bool
    group: str = ""  # the variant as the study YAML names it; its seeds share it
    seed: int | None = None  # train.seed of this run; None: the experiment's seed
    reference: ReferenceResult | None = None


@dataclass(frozen=True)
class StudyPlan:
    """A study expanded into validated variants, plus the methods it had to leave out and why."""

    study: StudyConfig
    variants: tuple[StudyVariant, ...]
    skipped_methods: dict[str, str] = field(default_factory=dict)

    @property
    def reference(self) -> ExperimentConfig:
        """The config whose shared fields (data, seed, tracking) every variant has."""
        return self.variants[0].config


@dataclass(frozen=True)
class StudyOutcome:
    """What a study run produced: every variant's report row, the report, what failed."""

    study: str
    parent_run_id: str
    data_md5: str
    baseline: RunResult
    results: list[dict]  # one report row per variant, in plan order
    report_paths: list[str]
    failed: list[str]  # names of the variants that failed
    max_parallel: int


# --- loading ------------------------------------------------------------------------


def study_variant(plan: StudyPlan, name: str) -> StudyVariant:
    """The plan's variant called ``name`` (a worker given one variant of a study)."""
    for variant in plan.variants:
        if variant.name == name:
            return variant
    names = ", ".join(v.name for v in plan.variants)
    raise ConfigError(f"study {plan.study.name} has no variant {name!r} (it has: {names})")


def plan_study(path: str | Path) -> StudyPlan:
    """Load a study and validate every variant before anything runs."""
    path = Path(path)
    study = load_study(path)
    base_path = _resolve_base(study.base, path)
    variants = [
        replicate
        for spec in study.variants
        for replicate in _with_seeds(study, _explicit_variant(study, spec, base_path), base_path)
    ]
    _refuse_repeated_runs(variants)
    skipped: dict[str, str] = {}
    if study.all_methods:
        variants, skipped = _add_method_variants(study, base_path, variants)
    _require_classification(study.name, variants)
    _require_shared_fields(study.name, variants)
    _preflight_variants(study.name, variants)
    return StudyPlan(study, tuple(variants), skipped)


def _require_classification(study_name: str, variants: list[StudyVariant]) -> None:
    """The study report compares classifiers (F1, accuracy); generation variants run alone."""
    generating = [v.name for v in variants if v.config.task != REPORTED_TASK]
    if generating:
        raise ConfigError(
            f"study {study_name}: variants {generating} have task 'generation', but studies "
            "compare classification variants; run generation configs one by one with "
            "`peftflow run --config FILE` and compare them in the MLflow UI"
        )


def _resolve_base(base: str, study_path: Path) -> Path:
    candidate = Path(base)
    resolved = candidate if candidate.is_absolute() else study_path.parent / candidate
    if not resolved.is_file():
        raise ConfigError(
            f"study {study_path}: base experiment {resolved} does not exist; set `base` to an "
            "experiment YAML, relative to the study file (e.g. ../experiments/demo.yaml)"
        )
    return resolved


def _variant_config(
    study: StudyConfig, base_path: Path, variant: str, overrides: Mapping[str, Any]
) -> ExperimentConfig:
    """base <- budget <- method_overrides[method] <- the variant's overrides."""
    own = dotted(overrides)
    first_pass = _load_variant(study, base_path, variant, {**dotted(study.budget), **own})
    per_method = dotted(study.method_overrides.get(first_pass.method.name, {}))
    layers = {**dotted(study.budget), **per_method, **own, "name": f"{study.name}-{variant}"}
    return _load_variant(study, base_path, variant, layers)


def _load_variant(
    study: StudyConfig, base_path: Path, variant: str, overrides: dict[str, Any]
) -> ExperimentConfig:
    try:
        return load_config(base_path, overrides)
    except ConfigError as err:
        raise ConfigError(
            f"study {study.name!r}, variant {variant!r} (base {base_path} + budget + "
            f"overrides) is not a valid experiment; fix the variant's overrides:\n{err}"
        ) from None


def _explicit_variant(study: StudyConfig, spec: VariantSpec, base_path: Path) -> StudyVariant:
    config = _variant_config(study, base_path, spec.name, spec.overrides)
    overrides = dotted(spec.overrides)
    return StudyVariant(
        spec.name,
        spec.questions,
        spec.note,
        overrides,
        config,
        False,
        spec.name,
        None,
        spec.reference,
    )


def _with_seeds(study: StudyConfig, variant: StudyVariant, base_path: Path) -> list[StudyVariant]:
    """The variant once per study seed (``train.seed``), or as it is when the study has none."""
    if not study.seeds:
        return [variant]
    replicates = []
    for seed in study.seeds:
        name = f"{variant.group}-seed{seed}"
        overrides = {**variant.overrides, "train.seed": seed}
        config = _variant_config(study, base_path, name, overrides)
        replicates.append(replace(variant, name=name, config=config, seed=seed))
    return replicates


def _refuse_repeated_runs(variants: list[StudyVariant]) -> None:
    """Two explicit variants with the same config would train the same model twice."""
    for position, variant in enumerate(variants):
        twin = _same_run_as(variant.config, variants[:position])
        if twin is not None:
            raise ConfigError(
                f"variants {variants[twin].name!r} and {variant.name!r} are the same run "
                "(identical config apart from the name); keep one and list both questions "
                "on it: `question: [first question, second question]`"
            )


# --- all_methods ----------------------------------------------------------------------


def _add_method_variants(
    study: StudyConfig, base_path: Path, variants: list[StudyVariant]
) -> tuple[list[StudyVariant], dict[str, str]]:
    """One variant per applicable method; reuse an explicit variant with the same config."""
    base_config = _variant_config(study, base_path, "methods", {})
    skipped = methods_not_applicable(base_config)
    result = list(variants)
    for method in METHOD_SETTINGS:
        if method in skipped:
            continue
        # An explicit variant of this method at the budget (its first seed's run) is the same one.
        first_seed = {"train.seed": study.seeds[0]} if study.seeds else {}
        probe = {"method.name": method, **first_seed}
        config = _variant_config(study, base_path, f"method-{method}", probe)
        twin = _same_run_as(config, result)
        if twin is not None:  # the same variant: mark every one of its seeds
            group = result[twin].group
            result = [replace(v, in_methods_table=True) if v.group == group else v for v in result]
            continue
        name = f"method-{method}"
        config = _variant_config(study, base_path, name, {"method.name": method})
        variant = StudyVariant(name, (), "", {"method.name": method}, config, True, name)
        result.extend(_with_seeds(study, variant, base_path))
    return result, skipped


def methods_not_applicable(config: ExperimentConfig) -> dict[str, str]:
    """Registry methods that cannot run for this config's model on this machine, with the reason."""
    facts = model_facts(config.model.name, config.model.revision)
    cuda = torch.cuda.is_available()
    problems = {name: method_problem(name, config, facts, cuda) for name in METHOD_SETTINGS}
    return {name: problem for name, problem in problems.items() if problem is not None}


def _same_run_as(config: ExperimentConfig, variants: list[StudyVariant]) -> int | None:
    """Index of a variant whose config differs from ``config`` only by name."""
    wanted = _without_name(config)
    return next(
        (i for i, variant in enumerate(variants) if _without_name(variant.config) == wanted),
        None,
    )


def _without_name(config: ExperimentConfig) -> dict:
    return {k: v for k, v in config.model_dump(mode="json").items() if k != "name"}


def _require_shared_fields(study: str, variants: list[StudyVariant]) -> None:
    """One split and one MLflow experiment for the whole study: refuse variants that differ."""
    reference = variants[0]
    for variant in variants[1:]:
        for name in SHARED_FIELDS:
            if getattr(variant.config, name) != getattr(reference.config, name):
                raise ConfigError(
                    f"study {study!r}: variant {variant.name!r} changes `{name}` (differs from "
                    f"variant {reference.name!r}); all variants share one split and one MLflow "
                    f"experiment, so set `{name}` in the base or `budget`, not per variant"
                )


def _preflight_variants(study: str, variants: list[StudyVariant]) -> None:
    """Every variant's model, method and machine checks (peftflow.task.preflight), before any
    work."""
    for variant in variants:
        try:
            preflight(variant.config)
        except ConfigError as err:
            raise ConfigError(f"study {study!r}, variant {variant.name!r}: {err}") from None


# --- running ---------------------------------------------------------------------------


def tokeniser_groups(plan: StudyPlan) -> dict[str, ExperimentConfig]:
    """One config per distinct tokenisation setting: the tokenisation check runs once for each."""
    groups: dict[str, ExperimentConfig] = {}
    for variant in plan.variants:
        groups.setdefault(tokeniser_key(variant.config), variant.config)
    return groups


def tokeniser_key(config: ExperimentConfig) -> str:
    """A short, path-safe key of what the tokenisation suite depends on."""
    model = config.model
    fields = (model.name, model.revision, model.max_length, model.padding_side)
    readable = Path(model.name).name.replace("/", "-")
    digest = hashlib.sha256(repr(fields + (model.max_truncation_rate,)).encode()).hexdigest()[:8]
    return f"{readable}-{model.max_length}-{digest}"


def study_identity(study: StudyConfig) -> str:
    """sha256 of what the study is (16 hex chars); how it runs (max_parallel) is left out."""
    identity = study.model_dump_json(exclude={"max_parallel", "isolate"})
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


@contextmanager
def parent_run(plan: StudyPlan, data_md5: str, root: Path, command: str) -> Iterator[RunTracker]:
    """The study's MLflow run; variant runs nest under it. FAILED if the block raises."""
    reference = plan.reference
    uri = resolve_tracking_uri(reference.tracking.tracking_uri, Path(root))
    experiment_id = ensure_experiment(reference.tracking.experiment, uri, Path(root))
    study_hash = study_identity(plan.study)
    tags = {
        **standard_tags(f"study-{study_hash}-{data_md5}", data_md5, study_hash, Path(root)),
        "peftflow.kind": "study",
        "peftflow.study": plan.study.name,
        "peftflow.command": command,
    }
    params = {
        "study.base": plan.study.base,
        "study.variants": len(plan.variants),
        **{f"budget.{key}": value for key, value in dotted(plan.study.budget).items()},
    }
    with RunTracker(uri) as tracker:
        tracker.start(experiment_id, f"study-{plan.study.name}", tags, params)
        tracker.log_dict(plan.study.model_dump(mode="json"), "study.json")
        yield tracker


def variant_parallelism(requested: int | None) -> int:
    """How many variants train at once: as requested, else one per GPU (2+ GPUs), else 1."""
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"max_parallel must be 1 or more, got {requested}")
        return requested
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return gpus if gpus >= 2 else 1


# A variant whose process died (a killed or lost worker) rather than raising an error.
CRASHED = "crashed"
# The statuses of variants that produced no run.
NOT_TRAINED = ("failed", CRASHED)


def variant_result(
    variant: StudyVariant, run: RunResult | None, error: str = "", crashed: bool = False
) -> dict:
    """The report's row for one variant: identity, settings, status and the reported metrics.

    ``run`` is the variant's trained (or cached) run; None, with ``error``, when it failed
    (``crashed``: its process died, so it raised nothing).
    """
    metrics = run.metrics if run else {}
    status = "cached" if run and run.cached else "trained"
    if error:
        status = CRASHED if crashed else "failed"
    return {
        "variant": variant.name,
        "group": variant.group or variant.name,
        "seed": variant.seed,
        "reference": variant.reference.model_dump() if variant.reference else None,
        "questions": list(variant.questions),
        "in_methods_table": variant.in_methods_table,
        "note": variant.note,
        "settings": describe_overrides(variant.overrides),
        "model": _display_model(variant.config.model.name),
        "method": variant.config.method.name,
        "run_id": run.run_id if run else None,
        "status": status,
        "error": error,
        **{key: metrics.get(key) for key in REPORT_METRICS},
    }


def baseline_result(run: RunResult) -> dict:
    """The TF-IDF + logistic-regression row (no trainable-parameter or memory figures)."""
    return {
        "variant": "tfidf-logreg",
        "method": "TF-IDF + logistic regression",
        "run_id": run.run_id,
        "status": "cached" if run.cached else "trained",
        **{key: run.metrics.get(key) for key in REPORT_METRICS},
    }


def describe_overrides(overrides: Mapping[str, Any]) -> str:
    """``{"model.pooling": "first"}`` -> ``model.pooling=first`` (model paths shortened)."""
    return ", ".join(
        f"{key}={_display_model(value) if key == 'model.name' else _yaml_scalar(value)}"
        for key, value in overrides.items()
    )


def _display_model(name: str) -> str:
    """Aliases and hub ids as written; a local folder by its own name, not its full path."""
    return Path(name).name if Path(name).is_absolute() else name


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()
