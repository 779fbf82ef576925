"""Commands over many runs: run a study (a sweep of variants) and compare an experiment's
variants (ranking, Pareto fronts, report).

Depends on: tracking, reporting, pipeline.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from peftflow.cli.common import ROOT_HELP, STORE_HELP, fail
from peftflow.errors import PeftflowError


def study(
    path: str = typer.Argument(..., help="Study YAML (see configs/studies/)."),
    root: Path = typer.Option(Path("."), help=ROOT_HELP),
    force: bool = typer.Option(False, help="Retrain variants whose run key was already trained."),
    remote: str | None = typer.Option(None, help="DVC remote URL (default: local .dvc-storage/)."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate every variant and list them; train nothing."
    ),
    max_parallel: int | None = typer.Option(
        None,
        "--max-parallel",
        min=1,
        help="Variants training at once, each in its own process (default: the study's "
        "max_parallel, else 1, or one per GPU with 2+ GPUs).",
    ),
    deployment: str | None = typer.Option(
        None,
        help="Send every variant to the workers of this deployment (e.g. "
        "train-variant/train-variant) instead of training here; needs PREFECT_API_URL "
        "and a DVC remote the workers share (PEFTFLOW_DVC_REMOTE).",
    ),
) -> None:
    """Run a sweep of variants as one Prefect flow; report under reports/<study>/."""
    from peftflow.pipeline.study import plan_study  # deferred: torch (method checks)

    try:
        plan = plan_study(path)
    except PeftflowError as err:
        fail(err)
    if dry_run:
        _print_plan(plan)
        return
    from flows.study import study as study_flow  # deferred: Prefect

    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    try:
        outcome = study_flow(
            study_path=str(Path(path).resolve()),
            root=str(root),
            command=command,
            force=force,
            remote_url=remote,
            max_parallel=max_parallel,
            deployment=deployment,
        )
    except PeftflowError as err:
        fail(err)
    _print_study_summary(outcome)


def _print_plan(plan) -> None:
    typer.echo(f"study {plan.study.name}: {len(plan.variants)} variants, all valid")
    width = max(len(variant.name) for variant in plan.variants)
    for variant in plan.variants:
        question = " / ".join(variant.questions) or "(methods table)"
        typer.echo(f"  {variant.name:<{width}} {variant.config.method.name:<20} {question}")
    for method, reason in plan.skipped_methods.items():
        typer.echo(f"  skipped method {method}: {reason}")


def _print_study_summary(outcome) -> None:
    width = max([len("variant")] + [len(row["variant"]) for row in outcome.results])
    typer.echo(f"\n{'variant':<{width}} {'status':<8} {'test F1':>8} {'trainable %':>12}")
    for row in outcome.results:
        f1, share = row.get("test_f1"), row.get("trainable_percent")
        f1_text = "-" if f1 is None else f"{f1:.4f}"
        share_text = "-" if share is None else f"{share:.3g}"
        typer.echo(f"{row['variant']:<{width}} {row['status']:<8} {f1_text:>8} {share_text:>12}")
    typer.echo(f"report: {outcome.report_paths[0]} (parent MLflow run {outcome.parent_run_id})")
    if outcome.failed:
        typer.secho(f"failed variants: {', '.join(outcome.failed)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)


def compare(
    experiment: str = typer.Option(..., "--experiment", "-e", help="MLflow experiment to compare."),
    metric: str | None = typer.Option(
        None, help="Higher-is-better metric to rank on (default: by task, test_f1 or test_bleu)."
    ),
    task: str | None = typer.Option(None, help="Only runs of this task (classification, ...)."),
    out: Path | None = typer.Option(
        None, help="Report folder (default: <root>/outputs/compare/<experiment>/)."
    ),
    root: Path = typer.Option(Path("."), help="Project folder; its mlflow.db is the store."),
    tracking_uri: str | None = typer.Option(None, help=STORE_HELP),
    no_log: bool = typer.Option(False, "--no-log", help="Write the report; log no MLflow run."),
) -> None:
    """Rank an experiment's fine-tuned runs, mark the Pareto fronts, write and log a report."""
    from peftflow.reporting.compare import (  # deferred: mlflow, matplotlib
        default_out_dir,
        run_compare,
        summary_text,
    )
    from peftflow.tracking.runs import resolve_tracking_uri  # deferred: mlflow

    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    uri = resolve_tracking_uri(tracking_uri, root)
    out_dir = out or default_out_dir(root, experiment)
    try:
        outcome = run_compare(experiment, uri, out_dir, command, metric, task, log=not no_log)
    except PeftflowError as err:
        fail(err)
    typer.echo(summary_text(outcome.comparison))
    typer.echo(f"report: {outcome.report_paths[0]}")
    if outcome.run_id:
        typer.echo(f"logged as MLflow run {outcome.run_id} (artifacts under comparison/)")
