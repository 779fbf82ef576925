"""A study: the pipeline's data stages once -> baseline once -> every variant nested -> report.

Every variant runs the pipeline (peftflow.pipeline.definition.variant_pipeline) on the
study's data, split and checks, under the study's MLflow run. Variants train one after
another, or with ``max_parallel`` > 1 (study YAML, flow parameter or ``peftflow study
--max-parallel``) as concurrent task runs in a process pool of that size: each variant
in its own process (own torch RNG, own share of the CPU threads, own GPU when the host
has several), its own MLflow run and its own outputs folder. Results keep the plan's
order either way.

With ``deployment`` (``peftflow study --deployment train-variant/train-variant``) every
variant instead becomes a flow run of that deployment (flows/train_variant.py), taken
by whichever worker polls its pool, on any machine: the worker pulls the study's data
version from the shared DVC remote, trains under the study's MLflow run, and the study
reads each result back from MLflow. A variant whose worker died is reported as crashed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from prefect import Task, flow, get_client, get_run_logger
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
from prefect.states import State
from prefect.task_runners import ProcessPoolTaskRunner

from flows import entry_point
from peftflow.config import dotted
from peftflow.pipeline import stages
from peftflow.pipeline.definition import DATA_STAGES, FULL, run, variant_pipeline
from peftflow.pipeline.results import PipelineState, RunContext
from peftflow.pipeline.study import (
    NOT_TRAINED,
    StudyOutcome,
    StudyPlan,
    StudyVariant,
    baseline_result,
    parent_run,
    plan_study,
    tokeniser_groups,
    tokeniser_key,
    variant_parallelism,
    variant_result,
)
from peftflow.reporting.study_report import ReportHeader
from peftflow.tracking.runs import resolve_tracking_uri
from tasks import study as study_tasks
from tasks import workers
from tasks.stages import STAGE_TASKS, run_as_task

# A variant ready to train: its training stage's task and that task's parameters.
Job = tuple[Task, dict]


@flow(name="study")
def study(
    study_path: str,
    root: str = ".",
    command: str | None = None,
    force: bool = False,
    remote_url: str | None = None,
    max_parallel: int | None = None,
    deployment: str | None = None,
) -> StudyOutcome:
    """Run a study YAML; every variant is validated before any data is touched.

    ``max_parallel`` (default: the study's own, else one variant at a time, or one
    per GPU on a multi-GPU host) bounds how many variants train at once here;
    ``deployment`` sends them to that deployment's workers instead (how many train at
    once is then the workers' and the pool's concurrency limit).
    """
    plan = plan_study(study_path)
    if deployment:
        workers.require_deployment(deployment)
    parallel = variant_parallelism(
        plan.study.max_parallel if max_parallel is None else max_parallel
    )
    ctx = RunContext(
        plan.reference,
        Path(root).resolve(),
        remote_url,
        reports_name=f"study-{plan.study.name}",
        entry_point=entry_point(__file__, "study"),
    )
    data = run(FULL.only(*DATA_STAGES), ctx, call=run_as_task)
    command = command or f"study(study_path={study_path!r}, root={root!r})"
    with parent_run(plan, data.data_md5, ctx.root, command) as parent:
        ctx = ctx.but(parent_run_id=parent.run_id)
        checked = _tokenisation_checks(plan, ctx, data)
        baseline = run(FULL.only("baseline"), ctx, data, call=run_as_task).baseline
        variants = _Variants(plan.variants, study_path, force)
        if deployment:
            rows = _run_on_workers(variants, ctx, checked, deployment)
        else:
            rows = _run_variants(variants, ctx, checked, parallel, plan.study.isolate)
        rows, evidence = study_tasks.evidence(
            plan.study, rows, baseline_result(baseline), _tracking_uri(plan, ctx)
        )
        out_dir = ctx.root / "reports" / plan.study.name
        paths = _report(plan, command, rows, baseline, evidence, out_dir)
        for path in paths:
            parent.log_artifact(path, "report")
        failed = [row["variant"] for row in rows if row["status"] in NOT_TRAINED]
        parent.set_tags(
            {
                "peftflow.failed_variants": ",".join(failed) or "none",
                "peftflow.max_parallel": str(parallel),
                "peftflow.variants_on": deployment or "this flow run",
            }
        )
    return StudyOutcome(
        plan.study.name, parent.run_id, data.data_md5, baseline, rows, paths, failed, parallel
    )


def _tokenisation_checks(
    plan: StudyPlan, ctx: RunContext, data: PipelineState
) -> dict[str, PipelineState]:
    """The shared results plus one tokenisation check per tokeniser (the raw-data suite gated
    the ingest, and variants share the data section, so it holds for all)."""
    return {
        key: run(
            FULL.only("check-tokenisation"),
            ctx.but(cfg=config, reports_name=f"{ctx.reports_name}-{key}"),
            data,
            call=run_as_task,
        )
        for key, config in tokeniser_groups(plan).items()
    }


def _tracking_uri(plan: StudyPlan, ctx: RunContext) -> str:
    return resolve_tracking_uri(plan.reference.tracking.tracking_uri, ctx.root)


def _report(plan: StudyPlan, command: str, rows, baseline, evidence, out_dir: Path) -> list[str]:
    header = ReportHeader(
        study=plan.study.name,
        command=command,
        description=plan.study.description,
        budget=dotted(plan.study.budget),
        skipped_methods=plan.skipped_methods,
        seeds=list(plan.study.seeds),
        reference_source=plan.study.reference_source,
        question_notes={q.question: q.note for q in plan.study.questions if q.note},
    )
    return study_tasks.report(header, rows, baseline_result(baseline), evidence, out_dir)


@dataclass(frozen=True)
class _Variants:
    """What the variants' runs need from the study: the plan's variants, where it came from."""

    plan: tuple[StudyVariant, ...]
    study_path: str
    force: bool


def _prepare(
    variants: _Variants, ctx: RunContext, checked: dict[str, PipelineState]
) -> tuple[list[dict | None], dict[int, Job]]:
    """Each variant up to training here (preflight, the run-key cache): the rows of the
    cached ones, and the training job of every other one, by plan index."""
    jobs: dict[int, Job] = {}
    rows: list[dict | None] = []
    for i, variant in enumerate(variants.plan):
        cfg = variant.config
        pipeline = variant_pipeline(cfg, variants.force)
        vctx = ctx.but(cfg=cfg, reports_name=None)
        before = run(
            pipeline.before(_training(pipeline)), vctx, checked[tokeniser_key(cfg)], run_as_task
        )
        if before.trained is not None:  # this run key already trained
            rows.append(variant_result(variant, before.trained))
            continue
        rows.append(None)
        jobs[i] = (STAGE_TASKS[_training(pipeline)], {"ctx": vctx, "state": before})
    return rows, jobs


def _run_variants(
    variants: _Variants,
    ctx: RunContext,
    checked: dict[str, PipelineState],
    parallel: int,
    isolate: bool = False,
) -> list[dict]:
    """Every variant's row, in plan order: cached ones reused, the rest trained here.

    The training stages run one by one, or side by side in a process pool; with
    ``isolate`` each in a fresh process of its own (so its peak memory is its own).
    A failure is recorded in its row, never fatal to the study.
    """
    rows, jobs = _prepare(variants, ctx, checked)
    if isolate and parallel == 1:
        outcomes = [_train_concurrently([job], 1)[0] for job in jobs.values()]
    elif parallel > 1 and len(jobs) > 1:
        outcomes = _train_concurrently(list(jobs.values()), parallel)
    else:
        outcomes = [_train_here(*job) for job in jobs.values()]
    for i, outcome in zip(jobs, outcomes, strict=True):
        rows[i] = _row(variants.plan[i], outcome)
    return rows


def _run_on_workers(
    variants: _Variants, ctx: RunContext, checked: dict[str, PipelineState], deployment: str
) -> list[dict]:
    """Every variant's row, in plan order: cached ones reused, the rest trained by flow runs
    of ``deployment`` on its pool's workers and read back from MLflow by run key."""
    rows, jobs = _prepare(variants, ctx, checked)
    workers.detect_lost_flow_runs(get_current_settings().flows.heartbeat_frequency or 180)
    study_path = _as_in_checkout(variants.study_path, ctx.root)
    submitted = {
        f"{ctx.parent_run_id}-{variants.plan[i].name}": {
            "study_path": study_path,
            "variant": variants.plan[i].name,
            "data_md5": params["state"].data_md5,
            "parent_run_id": ctx.parent_run_id,
            "force": variants.force,
        }
        for i, (_, params) in jobs.items()
    }
    get_run_logger().info("%d variants sent to %s", len(submitted), deployment)
    states = workers.wait_until_final(workers.submit(deployment, submitted))
    for (i, (_, params)), state in zip(jobs.items(), states.values(), strict=True):
        rows[i] = _worker_row(variants.plan[i], state, params["ctx"], params["state"])
    return rows


def _as_in_checkout(study_path: str, root: Path) -> str:
    """The study's path as a worker's checkout has it: relative to the project root."""
    path = Path(study_path).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else study_path


def _worker_row(variant: StudyVariant, state: State, ctx: RunContext, before) -> dict:
    """The row of a variant a worker ran: its MLflow run, or why there is none."""
    if state.is_completed():
        found = stages.find_cached_run(ctx, before)
        if found is not None:
            return variant_result(variant, replace(found, cached=False))
        error = "its flow run completed, but MLflow has no finished run with its run key"
        return variant_result(variant, None, error=error)
    get_run_logger().error("variant %s: %s (%s)", variant.name, state.name, state.message)
    error = f"flow run {state.name}: {state.message}"
    return variant_result(variant, None, error=error, crashed=state.is_crashed())


def _training(pipeline) -> str:
    """The name of the pipeline's training stage (one process, or data-parallel)."""
    return pipeline.names[-1]


def _train_here(task: Task, parameters: dict) -> State | BaseException:
    """Train one variant in the flow's own process (max_parallel 1)."""
    return task(**parameters, return_state=True)


def _train_concurrently(jobs: list[Job], parallel: int) -> list[State | BaseException]:
    """Submit every job to a pool of ``parallel`` processes; their final states, in order."""
    workers = min(parallel, len(jobs))
    get_run_logger().info("training %d variants, %d at a time", len(jobs), workers)
    setup = study_tasks.worker_setup_args(workers)
    runner = ProcessPoolTaskRunner(workers, initializer=study_tasks.setup_worker, initargs=setup)
    with _api_for_workers(), runner as pool:
        futures = [pool.submit(task, parameters) for task, parameters in jobs]
        return [_final_state(future) for future in futures]


@contextmanager
def _api_for_workers() -> Iterator[None]:
    """Point the pool's processes at this flow's Prefect API.

    Without ``PREFECT_API_URL`` the flow runs on a temporary server, and every
    worker process would start its own; pass them this one's address instead.
    """
    if PREFECT_API_URL.value():
        yield
        return
    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def _final_state(future) -> State | BaseException:
    """The task run's final state, or the error of a worker process that died under it."""
    try:
        future.wait()
        return future.state
    except Exception as error:  # e.g. BrokenProcessPool: the worker was killed (OOM)
        return error


def _row(variant: StudyVariant, state: State | BaseException) -> dict:
    """The report row of a trained variant; a failed one is recorded with its error."""
    error = state if isinstance(state, BaseException) else None
    if error is None and not state.is_completed():
        error = state.result(raise_on_failure=False)
    if error is None:
        return variant_result(variant, state.result())
    get_run_logger().error("variant %s failed: %s", variant.name, error)
    return variant_result(variant, None, error=f"{type(error).__name__}: {error}")
