"""Commands about one experiment: run it (the finetune flow), ingest its data, validate its
config, estimate its memory, list the methods, reproduce a run.

Each command imports the pipeline when it runs: ``peftflow config`` and ``peftflow
methods`` answer in about a second, without loading MLflow, Prefect or the models.

Depends on: config, models, task, pipeline.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import typer
import yaml

from peftflow.cli.common import DEMO_CONFIG, ROOT_HELP, SET_HELP, STORE_HELP, fail
from peftflow.config import ExperimentConfig, load_config, parse_overrides
from peftflow.errors import PeftflowError


def run(
    config: str = typer.Option(
        ..., "--config", "-c", help="Experiment YAML (see configs/experiments/)."
    ),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    root: Path = typer.Option(Path("."), help=ROOT_HELP),
    baseline: bool = typer.Option(
        True, help="Also run the baseline (TF-IDF + LR; zero-shot for generation)."
    ),
    force: bool = typer.Option(False, help="Retrain even when the run key was already trained."),
    remote: str | None = typer.Option(None, help="DVC remote URL (default: local .dvc-storage/)."),
) -> None:
    """Run one experiment end to end as a Prefect flow (train.devices > 1: data-parallel)."""
    run_flow(config, root, set_, baseline, force, remote)


def demo(
    root: Path = typer.Option(Path("."), help=ROOT_HELP),
    force: bool = typer.Option(False, help="Retrain even when the run key was already trained."),
) -> None:
    """The main job: SpamAssassin -> checks -> MiniLM fine-tune + baseline -> registry."""
    run_flow(str(root / DEMO_CONFIG), root, [], True, force, None)


def run_flow(config: str, root: Path, pairs: list[str], baseline: bool, force: bool, remote):
    """The finetune flow for ``config``; its summary printed, errors with their fix."""
    from flows.finetune import finetune  # deferred: Prefect and the pipeline take seconds
    from peftflow.task.preflight import preflight  # deferred: torch

    try:
        overrides = parse_overrides(pairs)
        cfg = load_config(config, overrides)
        # The flow checks this too (deployments skip the CLI); here it answers in a
        # second, before a temporary Prefect server is started.
        preflight(cfg)
        state = finetune(
            config_path=str(Path(config).resolve()),
            root=str(root),
            overrides=overrides,
            remote_url=remote,
            run_baseline=baseline,
            force=force,
        )
    except PeftflowError as err:
        fail(err)
    print_summary(cfg, state)
    return state


def print_summary(cfg: ExperimentConfig, state) -> None:
    """The baseline and the fine-tuned run side by side, and what the registry decided."""
    from peftflow.task.registry import task_for  # deferred: torch

    task = task_for(cfg)
    rows = [(task.baseline_label, state.baseline.metrics)] if state.baseline else []
    rows.append((cfg.name, state.trained.metrics))
    columns = (*task.summary_columns, ("train s", "train_seconds"))
    typer.echo(f"\nrun key {state.trained.run_key}  data md5 {state.data_md5}")
    typer.echo(f"{'model':<32}" + "".join(f" {header:>9}" for header, _ in columns))
    for name, metrics in rows:
        values = [metrics.get(key, float("nan")) for _, key in columns]
        typer.echo(f"{name:<32}" + "".join(f" {value:>9.4f}" for value in values))
    if state.trained.cached:
        typer.echo("fine-tuning served from cache: same run key already trained")
    if state.promotion is not None:
        verdict = "promoted to champion" if state.promotion.promoted else "not promoted"
        version = state.registered
        typer.echo(f"{version.name} v{version.version}: {verdict} ({state.promotion.reason})")


def ingest(
    config: str = typer.Option(
        DEMO_CONFIG, "--config", "-c", help="Experiment YAML naming the data."
    ),
    root: Path = typer.Option(Path("."), help="Project folder (data/ and data.dvc live here)."),
    remote: str | None = typer.Option(None, help="DVC remote URL (default: local .dvc-storage/)."),
) -> None:
    """Fetch and parse the configured data, gate it on the raw-data checks, track it with DVC
    and push it to the remote."""
    from peftflow.pipeline import definition  # deferred: DVC, Great Expectations, torch
    from peftflow.pipeline.results import RunContext  # deferred: with the pipeline

    try:
        ctx = RunContext(load_config(config), root.resolve(), remote)
        # DVC prints git hints on stdout; keep stdout for the JSON result only.
        with contextlib.redirect_stdout(sys.stderr):
            state = definition.run(definition.FULL.only("ingest"), ctx)
    except PeftflowError as err:
        fail(err)
    ingested = {**vars(state.ingested), "raw_report_paths": list(state.raw_check.report_paths)}
    typer.echo(json.dumps(ingested, indent=2, default=str))


def config(
    path: str = typer.Argument(..., help="Experiment YAML to validate."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Validate a config (and that its model, method and machine fit) and print it in full."""
    from peftflow.task.preflight import preflight  # deferred: torch

    try:
        cfg = load_config(path, parse_overrides(set_))
        preflight(cfg)
    except PeftflowError as err:
        fail(err)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    typer.echo(f"# config hash: {cfg.config_hash()}")


def estimate(
    config_path: str = typer.Option(..., "--config", help="Experiment YAML."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Micro-batch to size for."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Predict peak training memory (no weights loaded): parameters, optimizer, activations."""
    from peftflow.task.memory import estimate_config  # deferred: torch, transformers

    try:
        result = estimate_config(load_config(config_path, parse_overrides(set_)), batch_size)
    except PeftflowError as err:
        fail(err)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    counts = result.counts
    typer.echo(
        f"{result.architecture.model_type}: {counts.total:,} parameters, "
        f"{counts.trainable:,} trainable; batch {result.batch_size} x {result.seq_len} tokens, "
        f"{result.precision} on {result.device}"
    )
    typer.echo(result.table())
    for note in result.notes:
        typer.echo(f"# {note}")


def methods(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the docs' methods table."),
) -> None:
    """List the fine-tuning methods in the registry."""
    from peftflow.models.methods.registry import list_methods, methods_markdown  # deferred: peft

    listing = list_methods()
    if as_json:
        typer.echo(json.dumps(listing, indent=2))
    elif markdown:
        typer.echo(methods_markdown())
    else:
        for entry in listing:
            typer.echo(f"{entry['name']:<20} {entry['family']:<20} {entry['trains']}")


def reproduce(
    run_id: str = typer.Argument(..., help="MLflow run id of a fine-tuning run."),
    root: Path = typer.Option(Path("."), help="Project folder holding .dvc/, mlflow.db, outputs/."),
    tolerance: float = typer.Option(
        1e-6, min=0.0, help="Largest allowed difference of each test metric."
    ),
    tracking_uri: str | None = typer.Option(None, help=STORE_HELP),
) -> None:
    """Re-train a run with its config on its DVC data version; exit 1 if test metrics differ."""
    from peftflow.pipeline.reproduce import reproduce as rerun  # deferred: the pipeline

    try:
        with contextlib.redirect_stdout(sys.stderr):  # DVC's and training's progress output
            outcome = rerun(run_id, root, tolerance, tracking_uri)
    except PeftflowError as err:
        fail(err)
    typer.echo(outcome.table())
    if not outcome.reproduced:
        raise typer.Exit(code=1)
