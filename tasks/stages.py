"""The pipeline's stages as Prefect tasks: thin wrappers adding retries, timeouts and caching.

Each task runs one stage of :mod:`peftflow.pipeline.stages` on (context, results so far)
and returns its typed result; :func:`run_as_task` is the ``call`` the flows hand to
:func:`peftflow.pipeline.definition.run`, so the order of the stages is the pipeline's own.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from prefect import Task, task
from prefect.artifacts import create_markdown_artifact

from peftflow.errors import DataCheckError, FetchError, PeftflowError
from peftflow.pipeline import launch, stages
from peftflow.pipeline.definition import Stage
from peftflow.pipeline.results import PipelineState, RunContext

# A training run may take hours on a CPU; a hung one must still end.
TRAIN_TIMEOUT_SECONDS = 6 * 3600
# Tag of every training task: `prefect concurrency-limit create peftflow-train 4` caps how many
# train at once across every flow on the server.
TRAIN_TAG = "peftflow-train"


def publish_failed_report(stage: Callable) -> Callable:
    """Show a failed suite's report in the Prefect UI (it is also on disk), then re-raise."""

    @wraps(stage)
    def wrapper(*args, **kwargs):
        try:
            return stage(*args, **kwargs)
        except DataCheckError as err:
            suite = err.report.get("suite", "data-checks")
            create_markdown_artifact(
                key=f"failed-{suite}".replace("_", "-"),
                markdown=f"# {suite} failed\n\n```\n{err}\n```",
                description=f"Great Expectations suite {suite} failed",
            )
            raise

    return wrapper


def retry_only_fetch_failures(task, task_run, state) -> bool:
    """Retry a failed download (network, registry); bad data or config fails at once."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, FetchError) or not isinstance(error, PeftflowError)


@task(name="preflight")
def preflight(ctx: RunContext, state: PipelineState):
    return stages.preflight(ctx, state)


@task(
    name="ingest", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_only_fetch_failures
)
@publish_failed_report
def ingest(ctx: RunContext, state: PipelineState):
    return stages.ingest(ctx, state)


@task(name="checkout-data-version")
def checkout_data(ctx: RunContext, state: PipelineState, md5: str, dest: str, purpose: str):
    return stages.checkout_data(ctx, state, md5, dest, purpose)


@task(name="validate-raw-data")
@publish_failed_report
def validate_raw(ctx: RunContext, state: PipelineState):
    return stages.validate_raw(ctx, state)


def _split_cache_key(context, parameters: dict) -> str:
    ctx, state = parameters["ctx"], parameters["state"]
    return stages.split_cache_key(ctx.cfg, state.data_md5, ctx.root)


# Cacheable: the result (paths + summary, JSON) is persisted by Prefect and reused only
# while the files it names exist (see split()).
@task(name="split", persist_result=True, result_serializer="json", cache_key_fn=_split_cache_key)
def _split(ctx: RunContext, state: PipelineState):
    return stages.split(ctx, state)


def split(ctx: RunContext, state: PipelineState, **options):
    """The split task; its persisted result is reused only while the files it names exist."""
    fresh = not stages.split_written(ctx.cfg, state.data_md5, ctx.root)
    return _split.with_options(refresh_cache=fresh)(ctx, state, **options)


@task(name="validate-splits")
@publish_failed_report
def validate_splits(ctx: RunContext, state: PipelineState):
    return stages.validate_splits(ctx, state)


@task(name="check-tokenisation")
@publish_failed_report
def check_tokenisation(ctx: RunContext, state: PipelineState):
    return stages.check_tokenisation(ctx, state)


@task(name="baseline")
def baseline(ctx: RunContext, state: PipelineState):
    """TF-IDF + logistic regression (classification) or the zero-shot base (generation)."""
    return stages.baseline(ctx, state)


@task(name="find-cached-run")
def find_cached_run(ctx: RunContext, state: PipelineState):
    return stages.find_cached_run(ctx, state)


@task(name="train-and-evaluate", timeout_seconds=TRAIN_TIMEOUT_SECONDS, tags=[TRAIN_TAG])
def train(ctx: RunContext, state: PipelineState):
    return stages.train(ctx, state)


@task(name="train-data-parallel", timeout_seconds=TRAIN_TIMEOUT_SECONDS, tags=[TRAIN_TAG])
def train_data_parallel(ctx: RunContext, state: PipelineState):
    return launch.train_data_parallel(ctx, state)


# No task-level retries: registration retries transient store errors itself, and a whole
# re-run after a registration that did land would give the run a second version.
@task(name="register-model")
def register(ctx: RunContext, state: PipelineState):
    return stages.register(ctx, state)


@task(name="promote-model")
def promote(ctx: RunContext, state: PipelineState):
    return stages.promote(ctx, state)


STAGE_TASKS: dict[str, Task | Callable] = {
    "preflight": preflight,
    "ingest": ingest,
    "checkout-data-version": checkout_data,
    "validate-raw-data": validate_raw,
    "split": split,
    "validate-splits": validate_splits,
    "check-tokenisation": check_tokenisation,
    "baseline": baseline,
    "find-cached-run": find_cached_run,
    "train-and-evaluate": train,
    "train-data-parallel": train_data_parallel,
    "register-model": register,
    "promote-model": promote,
}


def run_as_task(stage: Stage, ctx: RunContext, state: PipelineState):
    """Run ``stage`` as its Prefect task (the ``call`` of peftflow.pipeline.definition.run)."""
    if stage.name not in STAGE_TASKS:
        raise KeyError(f"stage {stage.name!r} has no Prefect task; add one to tasks/stages.py")
    return STAGE_TASKS[stage.name](ctx, state, **stage.kwargs)
