"""A study: shared ingest, checks and split -> baseline -> every variant nested -> report.

Variants train one after another, or with ``max_parallel`` > 1 (study YAML, flow
parameter or ``peftflow study --max-parallel``) as concurrent task runs in a
process pool of that size: each variant in its own process (own torch RNG, own
share of the CPU threads, own GPU when the host has several), its own MLflow run
and its own outputs folder. Results keep the plan's order either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_client, get_run_logger
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import State
from prefect.task_runners import ProcessPoolTaskRunner

from peftflow.report import ReportHeader
from peftflow.study import (
    StudyPlan,
    StudyVariant,
    baseline_result,
    dotted,
    parent_run,
    plan_study,
    tokeniser_groups,
    tokeniser_key,
    variant_parallelism,
    variant_result,
)
from tasks import data, train
from tasks import study as study_tasks


@flow(name="study")
def study(
    study_path: str,
    root: str = ".",
    command: str | None = None,
    force: bool = False,
    remote_url: str | None = None,
    max_parallel: int | None = None,
) -> dict:
    """Run a study YAML; every variant is validated before any data is touched.

    ``max_parallel`` (default: the study's own, else one variant at a time, or one
    per GPU on a multi-GPU host) bounds how many variants train at once.
    """
    plan = plan_study(study_path)
    parallel = variant_parallelism(
        plan.study.max_parallel if max_parallel is None else max_parallel
    )
    base = Path(root).resolve()
    ingested = data.ingest(plan.reference, base, remote_url)
    md5 = ingested["data_md5"]
    command = command or f"study(study_path={study_path!r}, root={root!r})"
    with parent_run(plan, md5, base, command) as parent:
        split_paths, checks = _shared_data_checks(plan, ingested, base)
        baseline = study_tasks.baseline(plan.reference, split_paths, md5, base, parent.run_id)
        shared = SharedInputs(split_paths, md5, checks, base, parent.run_id)
        results = _run_variants(plan.variants, shared, force, parallel)
        header = ReportHeader(
            study=plan.study.name,
            command=command,
            description=plan.study.description,
            budget=dotted(plan.study.budget),
            skipped_methods=plan.skipped_methods,
        )
        out_dir = base / "reports" / plan.study.name
        paths = study_tasks.report(header, results, baseline_result(baseline), out_dir)
        for path in paths:
            parent.log_artifact(path, "report")
        failed = [row["variant"] for row in results if row["status"] == "failed"]
        parent.set_tags(
            {
                "peftflow.failed_variants": ",".join(failed) or "none",
                "peftflow.max_parallel": str(parallel),
            }
        )
    return {
        "study": plan.study.name,
        "parent_run_id": parent.run_id,
        "data_md5": md5,
        "baseline": baseline,
        "results": results,
        "report_paths": paths,
        "failed": failed,
        "max_parallel": parallel,
    }


def _shared_data_checks(
    plan: StudyPlan, ingested: dict, base: Path
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """One split and leakage check, one tokenisation check per tokeniser (the raw-data
    suite gated the ingest: variants share the data section, so it holds for all).

    Returns the split paths and, per tokeniser key, the check reports its variants log.
    """
    reference, md5 = plan.reference, ingested["data_md5"]
    reports = base / "outputs" / "reports" / f"study-{plan.study.name}-{md5}"
    splits = data.split(reference, ingested["table_path"], md5, base)
    leakage = data.validate_splits(splits["paths"], reports)
    shared = ingested["raw_report_paths"] + leakage["report_paths"]
    checks = {}
    for key, config in tokeniser_groups(plan).items():
        tokens = data.check_tokenisation(config, splits["paths"], reports / key)
        checks[key] = shared + tokens["report_paths"]
    return splits["paths"], checks


@dataclass(frozen=True)
class SharedInputs:
    """What every variant's training gets from the study: data, checks, parent run."""

    split_paths: dict[str, str]
    data_md5: str
    checks: dict[str, list[str]]  # report paths per tokeniser key
    root: Path
    parent_run_id: str

    def train_parameters(self, variant: StudyVariant) -> dict:
        """The train-variant task's parameters for ``variant``."""
        return {
            "cfg": variant.config,
            "split_paths": self.split_paths,
            "data_md5": self.data_md5,
            "report_paths": self.checks[tokeniser_key(variant.config)],
            "root": self.root,
            "parent_run_id": self.parent_run_id,
        }


def _run_variants(
    variants: tuple[StudyVariant, ...], shared: SharedInputs, force: bool, parallel: int
) -> list[dict]:
    """Every variant's row, in plan order: cached ones reused, the rest trained.

    A failure is recorded in its row, never fatal to the study.
    """
    rows: list[dict | None] = [_cached_row(v, shared, force) for v in variants]
    todo = [i for i, row in enumerate(rows) if row is None]
    if parallel > 1 and len(todo) > 1:
        states = _train_concurrently([variants[i] for i in todo], shared, parallel)
    else:
        states = [_train_here(variants[i], shared) for i in todo]
    for i, state in zip(todo, states, strict=True):
        rows[i] = _row(variants[i], state)
    return rows


def _cached_row(variant: StudyVariant, shared: SharedInputs, force: bool) -> dict | None:
    """The row of a variant whose run key already trained (nothing to train), else None."""
    cfg = variant.config
    cached = None if force else train.find_cached_run(cfg, shared.data_md5, shared.root)
    if not cached:
        return None
    get_run_logger().info("variant %s: run key already trained as run %s", variant.name, cached)
    return variant_result(variant, train.cached_run_summary(cfg, cached, shared.root))


def _train_here(variant: StudyVariant, shared: SharedInputs) -> State | BaseException:
    """Train one variant in the flow's own process (max_parallel 1)."""
    task = study_tasks.train_variant
    return task(**shared.train_parameters(variant), return_state=True)


def _train_concurrently(
    variants: list[StudyVariant], shared: SharedInputs, parallel: int
) -> list[State | BaseException]:
    """Submit every variant to a pool of ``parallel`` processes; their final states, in order."""
    workers = min(parallel, len(variants))
    get_run_logger().info("training %d variants, %d at a time", len(variants), workers)
    setup = study_tasks.worker_setup_args(workers)
    runner = ProcessPoolTaskRunner(workers, initializer=study_tasks.setup_worker, initargs=setup)
    with _api_for_workers(), runner as pool:
        futures = [
            pool.submit(study_tasks.train_variant, shared.train_parameters(variant))
            for variant in variants
        ]
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
