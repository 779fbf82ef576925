"""The ``peftflow`` command line: every command, one app, one ``--set`` parser.

Depends on: training.
"""

from __future__ import annotations

import typer

from peftflow.cli import data, experiments, models, studies, ui
from peftflow.errors import PeftflowError

app = typer.Typer(
    help="Workflow-orchestrated parameter-efficient fine-tuning: ingest, check, train, "
    "evaluate, track and promote.",
    no_args_is_help=True,
    add_completion=False,
)
for command in (
    experiments.run,
    experiments.demo,
    experiments.ingest,
    experiments.reproduce,
    experiments.methods,
    models.predict,
    models.promote,
    models.rollback,
    experiments.config,
    experiments.estimate,
    studies.study,
    studies.compare,
    ui.ui,
):
    app.command()(command)
app.add_typer(data.data_app, name="data")


def entry() -> None:
    """The ``peftflow`` console script: under tcmalloc when found (see training.allocator)."""
    from peftflow.training.allocator import reexec_under_tcmalloc  # deferred: not for `app()`

    try:
        reexec_under_tcmalloc()
    except PeftflowError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
    app()
