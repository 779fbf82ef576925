"""``peftflow ui``: the MLflow UI for this project's store, on loopback, in the foreground.

Depends on: tracking.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer

from peftflow.cli.common import STORE_HELP, fail
from peftflow.errors import PeftflowError

# The query that opens MLflow's UI on its "Model training" view (runs, models, registry).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""

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

    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        if _group_gone(process, timeout_seconds=15):
            return


def _group_gone(process, timeout_seconds: float) -> bool:
    """Wait until no process of ``process``'s group is left (its workers outlive it briefly)."""

    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        process.poll()  # reap our own child: unreaped, it would still count as in the group
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def ui(
    root: Path = typer.Option(Path("."), help="Project folder; its mlflow.db is the store."),
    tracking_uri: str | None = typer.Option(None, help=STORE_HELP),
    port: int = typer.Option(5000, min=1, max=65535, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (loopback by default)."),
    allow_remote: bool = typer.Option(
        False, "--allow-remote", help="Allow a non-loopback --host (the UI has no login)."
    ),
) -> None:
    """Browse the runs in the MLflow UI (foreground; Ctrl-C stops it)."""
    from peftflow.tracking.runs import resolve_tracking_uri  # deferred: mlflow

    if not (is_loopback(host) or allow_remote):
        fail(
            PeftflowError(
                f"--host {host} would expose the MLflow UI, which has no login, to the network; "
                "use 127.0.0.1 (and an SSH tunnel), or pass --allow-remote if you mean it."
            )
        )
    try:
        argv = ui_argv(resolve_tracking_uri(tracking_uri, root), host, port, root)
    except PeftflowError as err:
        fail(err)
    shown = f"[{host}]" if ":" in host else host
    # MLflow 3's UI picks its view from a switch kept in the browser (GenAI by default), not
    # from the experiment's kind: the link opens it on runs and models.
    typer.echo(
        f"MLflow UI: http://{shown}:{port}/#/experiments?{MODEL_TRAINING_VIEW} (Ctrl-C to stop)"
    )
    code = _serve_in_foreground(argv)
    if code:
        raise typer.Exit(code=code)
