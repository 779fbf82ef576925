"""What every command shares: errors printed with their fix, exit codes, the project root.

Depends on: nothing in peftflow beyond errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from peftflow.errors import DataCheckError

ROOT_HELP = "Project folder holding data/, mlflow.db, outputs/."
STORE_HELP = "MLflow store (default: $MLFLOW_TRACKING_URI, else <root>/mlflow.db)."
SET_HELP = "Override a field: --set train.epochs=2 (repeatable)."
DEMO_CONFIG = "configs/experiments/demo.yaml"


def fail(err: Exception) -> NoReturn:
    """Print the error (its message names the fix) and exit 2."""
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    if isinstance(err, DataCheckError) and err.report:
        typer.echo("(full report written under outputs/reports/ and logged to MLflow)", err=True)
    raise typer.Exit(code=2)


def root_option(help_text: str = ROOT_HELP) -> Path:
    return typer.Option(Path("."), help=help_text)
