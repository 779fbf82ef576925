"""The pipeline, declared once: which stages run, in which order, filling which result.

    preflight -> ingest (+ raw-data gate) -> validate-raw-data -> split -> validate-splits
    -> check-tokenisation -> baseline -> find-cached-run -> train-and-evaluate
    -> register-model -> promote-model

Every way of running an experiment runs this one definition and differs only by the
stages it declares skipped or replaced, and by the results it already has:

- the finetune flow runs all of it (``peftflow run``, the deployments);
- a study runs the data stages once, the baseline once, and each variant without
  baseline, registration or promotion;
- the nightly refresh gives every config the one ingest it made;
- ``peftflow reproduce`` replaces the ingest by a checkout of the run's data version and
  skips the cache, registration and promotion;
- ``train.devices`` > 1 replaces training by a data-parallel launch
  (:mod:`peftflow.pipeline.launch`).

A stage runs unless it is skipped, its result is already there, or its condition
says otherwise (nothing is registered for a run served from the cache). How a stage
is called is the caller's: directly (:func:`call_directly`), or as an orchestrator's
task (``tasks/stages.py`` wraps each stage in a Prefect task).

Depends on: config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftflow.config import ExperimentConfig
from peftflow.pipeline import launch, stages
from peftflow.pipeline.results import PipelineState, RunContext

StageFunction = Callable[[RunContext, PipelineState], Any]


def always(ctx: RunContext, state: PipelineState) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """A named step: what it runs, the result slot(s) it fills, and when it applies."""

    name: str  # also its orchestrator task's name
    run: StageFunction
    fills: tuple[str, ...]  # PipelineState fields; the first decides whether it already ran
    when: Callable[[RunContext, PipelineState], bool] = always
    # Keyword arguments of this use of the stage (the data version a checkout restores).
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    def due(self, ctx: RunContext, state: PipelineState) -> bool:
        return not state.filled(self.fills[0]) and self.when(ctx, state)

    def store(self, state: PipelineState, result: Any) -> PipelineState:
        values = result if len(self.fills) > 1 else (result,)
        return state.with_results(dict(zip(self.fills, values, strict=True)))


def _trained_now(ctx: RunContext, state: PipelineState) -> bool:
    """Register only what this run trained: a cached run key was registered when it trained."""
    return not state.trained.cached and ctx.cfg.tracking.register_model


def _registered(ctx: RunContext, state: PipelineState) -> bool:
    return state.registered is not None


STAGES: tuple[Stage, ...] = (
    Stage("preflight", stages.preflight, ("facts",)),
    Stage("ingest", stages.ingest, ("ingested", "raw_check")),
    Stage("validate-raw-data", stages.validate_raw, ("raw_check",)),
    Stage("split", stages.split, ("split",)),
    Stage("validate-splits", stages.validate_splits, ("split_check",)),
    Stage("check-tokenisation", stages.check_tokenisation, ("token_check",)),
    Stage("baseline", stages.baseline, ("baseline",)),
    Stage("find-cached-run", stages.find_cached_run, ("trained",)),
    Stage("train-and-evaluate", stages.train, ("trained",)),
    Stage("register-model", stages.register, ("registered",), when=_trained_now),
    Stage("promote-model", stages.promote, ("promotion",), when=_registered),
)
DATA_STAGES = ("ingest", "validate-raw-data", "split", "validate-splits")
# Replaces train-and-evaluate where train.devices > 1: N processes, one MLflow run.
TRAIN_DATA_PARALLEL = Stage("train-data-parallel", launch.train_data_parallel, ("trained",))


@dataclass(frozen=True)
class Pipeline:
    """The stages to run, in order; built from :data:`STAGES` by skipping or replacing."""

    stages: tuple[Stage, ...]

    @property
    def names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def without(self, *names: str) -> Pipeline:
        """The same pipeline with the named stages skipped."""
        _require_known(self, names)
        return Pipeline(tuple(s for s in self.stages if s.name not in names))

    def only(self, *names: str) -> Pipeline:
        """Just the named stages (in pipeline order)."""
        _require_known(self, names)
        return Pipeline(tuple(s for s in self.stages if s.name in names))

    def before(self, name: str) -> Pipeline:
        """The stages that run before ``name``."""
        _require_known(self, (name,))
        return Pipeline(self.stages[: self.names.index(name)])

    def replacing(self, name: str, stage: Stage) -> Pipeline:
        """``stage`` instead of stage ``name``, in its place (it must fill the same result)."""
        _require_known(self, (name,))
        old = self.stages[self.names.index(name)]
        if stage.fills[0] != old.fills[0]:
            raise ValueError(f"stage {stage.name!r} fills {stage.fills}, {name!r} {old.fills}")
        return Pipeline(tuple(stage if s.name == name else s for s in self.stages))

    def stage(self, name: str) -> Stage:
        _require_known(self, (name,))
        return self.stages[self.names.index(name)]


def _require_known(pipeline: Pipeline, names: Iterable[str]) -> None:
    unknown = [name for name in names if name not in pipeline.names]
    if unknown:
        raise ValueError(f"no stage {unknown} in this pipeline (stages: {pipeline.names})")


FULL = Pipeline(STAGES)

Call = Callable[[Stage, RunContext, PipelineState], Any]


def call_directly(stage: Stage, ctx: RunContext, state: PipelineState) -> Any:
    return stage.run(ctx, state, **stage.kwargs)


def run(
    pipeline: Pipeline,
    ctx: RunContext,
    state: PipelineState | None = None,
    call: Call = call_directly,
) -> PipelineState:
    """Run the due stages of ``pipeline`` in order; the final results."""
    state = state or PipelineState()
    for stage in pipeline.stages:
        if stage.due(ctx, state):
            state = stage.store(state, call(stage, ctx, state))
    return state


def finetune_pipeline(
    cfg: ExperimentConfig, baseline: bool = True, force: bool = False
) -> Pipeline:
    """One experiment end to end: everything, as the config and the caller ask.

    ``baseline=False`` skips the baseline; ``force`` retrains a run key already trained;
    ``train.devices`` > 1 trains data-parallel.
    """
    pipeline = FULL
    if not baseline:
        pipeline = pipeline.without("baseline")
    if force:
        pipeline = pipeline.without("find-cached-run")
    if cfg.train.devices > 1:
        pipeline = pipeline.replacing("train-and-evaluate", TRAIN_DATA_PARALLEL)
    return pipeline


def variant_pipeline(cfg: ExperimentConfig, force: bool = False) -> Pipeline:
    """A study variant: its data, checks and baseline come from the study; nothing registers."""
    pipeline = finetune_pipeline(cfg, baseline=False, force=force)
    return pipeline.without("register-model", "promote-model")


def on_data_version(pipeline: Pipeline, md5: str, dest: Path, purpose: str) -> Pipeline:
    """``pipeline`` with its ingest replaced by a checkout of data version ``md5`` into ``dest``.

    The raw-data suite still runs on what was checked out (as it gated the ingest).
    """
    checkout = Stage(
        "checkout-data-version",
        stages.checkout_data,
        ("ingested",),
        params=(("md5", md5), ("dest", str(dest)), ("purpose", purpose)),
    )
    return pipeline.replacing("ingest", checkout)
