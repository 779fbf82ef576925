"""The ``peftflow`` command line.

Commands that run pipelines import the Prefect flows lazily, so the package
itself never imports Prefect (``peftflow methods`` and ``peftflow config``
start in a second).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import typer
import yaml

from peftflow.errors import DataCheckError, PeftflowError

app = typer.Typer(
    help="Workflow-orchestrated parameter-efficient fine-tuning: ingest, check, train, "
    "evaluate, track and promote.",
    no_args_is_help=True,
    add_completion=False,
)

DEMO_CONFIG = "configs/experiments/demo.yaml"


def _parse_overrides(pairs: list[str]) -> dict[str, object]:
    """``train.epochs=2`` -> {"train.epochs": 2} (values parsed as YAML scalars)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set expects KEY=VALUE (e.g. train.epochs=2), got {pair!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    if isinstance(err, DataCheckError) and err.report:
        typer.echo("(full report written under outputs/reports/ and logged to MLflow)", err=True)
    raise typer.Exit(code=2)


def _run_flow(
    config: str, root: Path, overrides: dict, baseline: bool, force: bool, remote: str | None
):
    from flows.finetune import finetune
    from peftflow.config import load_config
    from peftflow.preflight import preflight

    try:
        # The flow checks this too (deployments skip the CLI); here it answers in a
        # second, before a temporary Prefect server is started.
        preflight(load_config(config, overrides))
        summary = finetune(
            config_path=str(Path(config).resolve()),
            root=str(root),
            overrides=overrides,
            remote_url=remote,
            run_baseline=baseline,
            force=force,
        )
    except PeftflowError as err:
        _fail(err)
    _print_summary(summary)
    return summary


# Columns of the summary table per task: (header, metric).
SUMMARY_COLUMNS = {
    "classification": [("test acc", "test_accuracy"), ("test F1", "test_f1")],
    "generation": [("BLEU", "test_bleu"), ("chrF", "test_chrf"), ("ROUGE-L", "test_rougeL")],
}
BASELINE_NAMES = {"classification": "tfidf_logreg (baseline)", "generation": "zero-shot (baseline)"}


def _print_summary(summary: dict) -> None:
    task = summary.get("task", "classification")
    rows = []
    if "baseline" in summary:
        rows.append((BASELINE_NAMES[task], summary["baseline"]["metrics"]))
    rows.append((summary["config"], summary["finetune"]["metrics"]))
    columns = SUMMARY_COLUMNS[task] + [("train s", "train_seconds")]
    typer.echo(f"\nrun key {summary['run_key']}  data md5 {summary['data']['data_md5']}")
    typer.echo(f"{'model':<32}" + "".join(f" {header:>9}" for header, _ in columns))
    for name, metrics in rows:
        values = [metrics.get(key, float("nan")) for _, key in columns]
        typer.echo(f"{name:<32}" + "".join(f" {value:>9.4f}" for value in values))
    if summary["finetune"].get("cached"):
        typer.echo("fine-tuning served from cache: same run key already trained")
    if "promotion" in summary:
        decision = summary["promotion"]
        verdict = "promoted to champion" if decision["promoted"] else "not promoted"
        version = summary["registered"]["version"]
        typer.echo(f"{summary['registered']['name']} v{version}: {verdict} ({decision['reason']})")


@app.command()
def run(
    config: str = typer.Option(
        ..., "--config", "-c", help="Experiment YAML (see configs/experiments/)."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override a field: --set train.epochs=2"),
    root: Path = typer.Option(Path("."), help="Project folder holding data/, mlflow.db, outputs/."),
    baseline: bool = typer.Option(
        True, help="Also run the baseline (TF-IDF + LR; zero-shot for generation)."
    ),
    force: bool = typer.Option(False, help="Retrain even when the run key was already trained."),
    remote: str | None = typer.Option(None, help="DVC remote URL (default: local .dvc-storage/)."),
) -> None:
    """Run one experiment end to end as a Prefect flow."""
    _run_flow(config, root, _parse_overrides(set_), baseline, force, remote)


@app.command()
def demo(
    root: Path = typer.Option(Path("."), help="Project folder holding data/, mlflow.db, outputs/."),
    force: bool = typer.Option(False, help="Retrain even when the run key was already trained."),
) -> None:
    """The main job: SpamAssassin -> checks -> MiniLM fine-tune + baseline -> registry."""
    _run_flow(str(root / DEMO_CONFIG), root, {}, True, force, None)


@app.command()
def ingest(
    config: str = typer.Option(
        DEMO_CONFIG, "--config", "-c", help="Experiment YAML naming the data."
    ),
    root: Path = typer.Option(Path("."), help="Project folder (data/ and data.dvc live here)."),
    remote: str | None = typer.Option(None, help="DVC remote URL (default: local .dvc-storage/)."),
) -> None:
    """Fetch and parse the configured data, track it with DVC and push it to the remote."""
    from peftflow.config import load_config
    from peftflow.pipeline import ingest_stage

    try:
        # DVC prints git hints on stdout; keep stdout for the JSON result only.
        with contextlib.redirect_stdout(sys.stderr):
            result = ingest_stage(load_config(config), root.resolve(), remote)
    except PeftflowError as err:
        _fail(err)
    typer.echo(json.dumps(result, indent=2, default=str))


data_app = typer.Typer(help="Check and repair the DVC-tracked data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("verify")
def data_verify(
    root: Path = typer.Option(Path("."), help="Project folder (data/ and data.dvc live here)."),
    target: str = typer.Option("data", help="The DVC-tracked folder (data.data_dir)."),
    repair: bool = typer.Option(
        False, "--repair", help="Restore bad copies: cache from data/ or the remote, then data/."
    ),
    remote: bool = typer.Option(
        False,
        "--remote",
        help="Also re-hash the default remote's copies (streamed); with --repair, re-upload "
        "the bad or missing ones from the verified cache.",
    ),
) -> None:
    """Re-hash data/ and its DVC cache objects against data.dvc; exit 2 on any mismatch."""
    from peftflow.data import dvc_store

    try:
        with contextlib.redirect_stdout(sys.stderr):  # DVC's progress output
            restored = dvc_store.repair(root, target) if repair else []
            check = dvc_store.verify(root, target)
            in_remote = None
            if remote and repair:
                uploaded, in_remote = dvc_store.repair_remote(root, target)
                restored += uploaded
            elif remote:
                in_remote = dvc_store.verify_remote(root, target)
    except PeftflowError as err:
        _fail(err)
    for line in restored:
        typer.echo(f"restored {line}")
    bad = check.cache + check.workspace + (in_remote.bad if in_remote else ())
    if bad:
        problems = "\n".join(f"  - {item.describe()}" for item in bad)
        _fail(
            PeftflowError(
                f"data {check.data_md5} differs from {target}.dvc:\n{problems}\n"
                + _verify_fix(target, remote)
            )
        )
    typer.echo(f"data {check.data_md5}: {check.n_files} files, cache and {target}/ ok")
    if in_remote is not None:
        typer.echo(f"remote {in_remote.url}: {in_remote.n_objects} objects ok")


def _verify_fix(target: str, remote: bool) -> str:
    fix = (
        "Run `peftflow data verify --repair` to restore the cache (from data/ or the remote) "
        f"and {target}/ (from the cache)"
    )
    if remote:
        fix = fix.replace("--repair", "--repair --remote") + ", and the remote (from the cache)"
    return fix + "."


@app.command()
def reproduce(
    run_id: str = typer.Argument(..., help="MLflow run id of a fine-tuning run."),
    root: Path = typer.Option(Path("."), help="Project folder holding .dvc/, mlflow.db, outputs/."),
    tolerance: float = typer.Option(
        1e-6, min=0.0, help="Largest allowed difference of each test metric."
    ),
    tracking_uri: str | None = typer.Option(
        None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else <root>/mlflow.db)."
    ),
) -> None:
    """Re-train a run with its config on its DVC data version; exit 1 if test metrics differ."""
    from peftflow.reproduce import reproduce as rerun

    try:
        with contextlib.redirect_stdout(sys.stderr):  # DVC's and training's progress output
            outcome = rerun(run_id, root, tolerance, tracking_uri)
    except PeftflowError as err:
        _fail(err)
    typer.echo(outcome.table())
    if not outcome.reproduced:
        raise typer.Exit(code=1)


@app.command()
def methods(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the README's methods table."),
) -> None:
    """List the fine-tuning methods in the registry."""
    from peftflow.methods import list_methods, methods_markdown

    listing = list_methods()
    if as_json:
        typer.echo(json.dumps(listing, indent=2))
    elif markdown:
        typer.echo(methods_markdown())
    else:
        for entry in listing:
            typer.echo(f"{entry['name']:<20} {entry['family']:<20} {entry['trains']}")


@app.command()
def predict(
    model: str = typer.Option(
        ...,
        "--model",
        "-m",
        help="models:/NAME@alias, models:/NAME/V, runs:/ID/model, or a folder.",
    ),
    input_path: Path = typer.Option(..., "--input", "-i", help="CSV, JSONL or parquet file."),
    output_path: Path = typer.Option(..., "--output", "-o", help="CSV, JSONL or parquet file."),
    text_column: str = typer.Option("text", help="The input column holding the texts."),
    batch_size: int = typer.Option(64, min=1, help="Rows per prediction batch."),
    root: Path = typer.Option(Path("."), help="Project folder; its mlflow.db is the store."),
) -> None:
    """Predict (labels or generated text) for every row of a file; input columns are kept."""
    from peftflow.predict import load_predictor, predict_file
    from peftflow.tracking import resolve_tracking_uri

    try:
        predictor = load_predictor(model, resolve_tracking_uri(None, root))
        written = predict_file(predictor, input_path, output_path, text_column, batch_size)
    except PeftflowError as err:
        _fail(err)
    typer.echo(f"wrote {written}")


@app.command()
def promote(
    model: str = typer.Option(..., "--model", "-m", help="Registered model name."),
    version: str = typer.Option(..., "--version", "-v", help="The candidate version."),
    metric: str | None = typer.Option(None, help="Test metric (default: by task, F1 or BLEU)."),
    margin: float = typer.Option(0.0, min=0.0, help="How much the champion must be beaten by."),
    root: Path = typer.Option(Path("."), help="Project folder; its mlflow.db is the store."),
) -> None:
    """Move alias champion to VERSION only through the gate; exit 1 when the gate refuses."""
    from peftflow.registry import promote as gated_promotion
    from peftflow.tracking import resolve_tracking_uri

    try:
        decision = gated_promotion(model, version, resolve_tracking_uri(None, root), metric, margin)
    except PeftflowError as err:
        _fail(err)
    verdict = "promoted to champion" if decision.promoted else "NOT promoted"
    typer.echo(f"{model} v{version}: {verdict} ({decision.reason})")
    if not decision.promoted:
        raise typer.Exit(code=1)


@app.command()
def rollback(
    model: str = typer.Option(..., "--model", "-m", help="Registered model name."),
    root: Path = typer.Option(Path("."), help="Project folder; its mlflow.db is the store."),
) -> None:
    """Give alias champion back to the version that held it before (alias previous)."""
    from peftflow.registry import rollback as rollback_champion
    from peftflow.tracking import resolve_tracking_uri

    try:
        restored = rollback_champion(model, resolve_tracking_uri(None, root))
    except PeftflowError as err:
        _fail(err)
    typer.echo(f"{model}: champion is v{restored} again")


@app.command()
def config(
    path: str = typer.Argument(..., help="Experiment YAML to validate."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: --set train.epochs=2"),
) -> None:
    """Validate a config (and that its model, method and machine fit) and print it in full."""
    from peftflow.config import load_config
    from peftflow.preflight import preflight

    try:
        cfg = load_config(path, _parse_overrides(set_))
        preflight(cfg)
    except PeftflowError as err:
        _fail(err)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    typer.echo(f"# config hash: {cfg.config_hash()}")


@app.command()
def estimate(
    config_path: str = typer.Option(..., "--config", help="Experiment YAML."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: --set train.epochs=2"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Micro-batch to size for."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Predict peak training memory (no weights loaded): parameters, optimizer, activations."""
    from peftflow.config import load_config
    from peftflow.estimate import estimate_config

    try:
        result = estimate_config(load_config(config_path, _parse_overrides(set_)), batch_size)
    except PeftflowError as err:
        _fail(err)
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


@app.command()
def study(
    path: str = typer.Argument(..., help="Study YAML (see configs/studies/)."),
    root: Path = typer.Option(Path("."), help="Project folder holding data/, mlflow.db, outputs/."),
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
) -> None:
    """Run a sweep of variants as one Prefect flow; report under reports/<study>/."""
    import shlex
    import sys

    from peftflow.study import plan_study

    try:
        plan = plan_study(path)
    except PeftflowError as err:
        _fail(err)
    if dry_run:
        _print_plan(plan)
        return
    from flows.study import study as study_flow

    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    try:
        summary = study_flow(
            study_path=str(Path(path).resolve()),
            root=str(root),
            command=command,
            force=force,
            remote_url=remote,
            max_parallel=max_parallel,
        )
    except PeftflowError as err:
        _fail(err)
    _print_study_summary(summary)


def _print_plan(plan) -> None:
    typer.echo(f"study {plan.study.name}: {len(plan.variants)} variants, all valid")
    for variant in plan.variants:
        question = " / ".join(variant.questions) or "(methods table)"
        typer.echo(f"  {variant.name:<34} {variant.config.method.name:<20} {question}")
    for method, reason in plan.skipped_methods.items():
        typer.echo(f"  skipped method {method}: {reason}")


def _print_study_summary(summary: dict) -> None:
    typer.echo(f"\n{'variant':<28} {'status':<8} {'test F1':>8} {'trainable %':>12}")
    for row in summary["results"]:
        f1, share = row.get("test_f1"), row.get("trainable_percent")
        f1_text = "-" if f1 is None else f"{f1:.4f}"
        share_text = "-" if share is None else f"{share:.3g}"
        typer.echo(f"{row['variant']:<28} {row['status']:<8} {f1_text:>8} {share_text:>12}")
    report, parent = summary["report_paths"][0], summary["parent_run_id"]
    typer.echo(f"report: {report} (parent MLflow run {parent})")
    if summary["failed"]:
        failed = ", ".join(summary["failed"])
        typer.secho(f"failed variants: {failed}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)


@app.command()
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
    tracking_uri: str | None = typer.Option(
        None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else <root>/mlflow.db)."
    ),
    no_log: bool = typer.Option(False, "--no-log", help="Write the report; log no MLflow run."),
) -> None:
    """Rank an experiment's fine-tuned runs, mark the Pareto fronts, write and log a report."""
    import shlex

    from peftflow.compare import default_out_dir, run_compare, summary_text
    from peftflow.tracking import resolve_tracking_uri

    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    uri = resolve_tracking_uri(tracking_uri, root)
    out_dir = out or default_out_dir(root, experiment)
    try:
        outcome = run_compare(experiment, uri, out_dir, command, metric, task, log=not no_log)
    except PeftflowError as err:
        _fail(err)
    typer.echo(summary_text(outcome.comparison))
    typer.echo(f"report: {outcome.report_paths[0]}")
    if outcome.run_id:
        typer.echo(f"logged as MLflow run {outcome.run_id} (artifacts under comparison/)")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ui_argv(tracking_uri: str, host: str, port: int, root: Path) -> list[str]:
    """The ``mlflow ui`` command line for ``tracking_uri`` (one worker: it starts in ~20 s)."""
    if tracking_uri.startswith(("http://", "https://")):
        raise PeftflowError(
            f"{tracking_uri} is a tracking server, which serves its own UI: open it in a "
            "browser, or pass --tracking-uri/--root for a local store to browse."
        )
    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri]
    argv += ["--host", host, "--port", str(port), "--workers", "1"]
    if tracking_uri.startswith("sqlite:"):
        # Experiments created from the UI then keep artifacts where peftflow puts them.
        argv += ["--default-artifact-root", (Path(root).resolve() / "mlruns").as_uri()]
    return argv


# The UI's background job runner serves GenAI features (scorers, prompt optimisation), not run
# browsing, and costs eight more processes; an exported value still wins.
UI_ENV_DEFAULTS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _serve_in_foreground(argv: list[str]) -> int:
    """Run the UI until it exits; Ctrl-C (or SIGTERM) here stops it and every worker it started."""
    import os
    import signal
    import subprocess

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # Its own process group, so one signal reaches the server's workers too, and Ctrl-C reaches
    # only us: we stop the group with SIGTERM, which its Python processes end on quietly
    # (SIGINT would print a KeyboardInterrupt traceback from each of them).
    env = {**UI_ENV_DEFAULTS, **os.environ}
    process = subprocess.Popen(argv, process_group=0, env=env)
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        return process.wait()
    except KeyboardInterrupt:
        _stop_process_group(process)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_process_group(process) -> None:
    """SIGTERM to the UI's group (a clean shutdown), SIGKILL to whatever is left after a while."""
    import os
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        if _group_gone(process, timeout_seconds=15):
            return


def _group_gone(process, timeout_seconds: float) -> bool:
    """Wait until no process of ``process``'s group is left (its workers outlive it briefly)."""
    import os
    import time

    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        process.poll()  # reap our own child: unreaped, it would still count as in the group
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@app.command()
def ui(
    root: Path = typer.Option(Path("."), help="Project folder; its mlflow.db is the store."),
    tracking_uri: str | None = typer.Option(
        None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else <root>/mlflow.db)."
    ),
    port: int = typer.Option(5000, min=1, max=65535, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (loopback by default)."),
    allow_remote: bool = typer.Option(
        False, "--allow-remote", help="Allow a non-loopback --host (the UI has no login)."
    ),
) -> None:
    """Browse the runs in the MLflow UI (foreground; Ctrl-C stops it)."""
    from peftflow.tracking import resolve_tracking_uri

    if not (is_loopback(host) or allow_remote):
        _fail(
            PeftflowError(
                f"--host {host} would expose the MLflow UI, which has no login, to the network; "
                "use 127.0.0.1 (and an SSH tunnel), or pass --allow-remote if you mean it."
            )
        )
    try:
        argv = ui_argv(resolve_tracking_uri(tracking_uri, root), host, port, root)
    except PeftflowError as err:
        _fail(err)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"MLflow UI: http://{shown}:{port} (Ctrl-C to stop)")
    code = _serve_in_foreground(argv)
    if code:
        raise typer.Exit(code=code)


def entry() -> None:
    """The ``peftflow`` console script: under tcmalloc when found (see peftflow.allocator)."""
    from peftflow.allocator import reexec_under_tcmalloc

    try:
        reexec_under_tcmalloc()
    except PeftflowError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
    app()


if __name__ == "__main__":
    entry()
