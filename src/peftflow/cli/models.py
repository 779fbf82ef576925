"""Commands about registered models: predict with one, promote one through the gate, roll
back the champion.

Depends on: config, tracking, serving, pipeline.
"""

from __future__ import annotations

from pathlib import Path

import typer

from peftflow.cli.common import fail
from peftflow.config import TrackingConfig
from peftflow.errors import PeftflowError

STORE_ROOT_HELP = "Project folder; its mlflow.db is the store."
GATE_DEFAULTS = TrackingConfig()  # the gate's defaults, as a config without them has them


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
    root: Path = typer.Option(Path("."), help=STORE_ROOT_HELP),
    trust_model: bool = typer.Option(
        False,
        "--trust-model",
        help="Load a store's model that peftflow did not log (it runs the code stored with it).",
    ),
) -> None:
    """Predict (labels or generated text) for every row of a file; input columns are kept."""
    from peftflow.serving import predict as serving  # deferred: torch, mlflow
    from peftflow.tracking.runs import resolve_tracking_uri  # deferred: mlflow

    try:
        # The files first: a bad input or output name is refused before the model loads.
        serving.output_writer(output_path)
        frame = serving.read_input_table(input_path, text_column)
        predictor = serving.load_predictor(model, resolve_tracking_uri(None, root), trust_model)
        written = serving.predict_frame_to_file(
            predictor, frame, output_path, text_column, batch_size
        )
    except PeftflowError as err:
        fail(err)
    typer.echo(f"wrote {written}")


def promote(
    model: str = typer.Option(..., "--model", "-m", help="Registered model name."),
    version: str = typer.Option(..., "--version", "-v", help="The candidate version."),
    metric: str | None = typer.Option(None, help="Test metric (default: by task, F1 or BLEU)."),
    margin: float = typer.Option(0.0, min=0.0, help="How much the champion must be beaten by."),
    confidence: float = typer.Option(
        GATE_DEFAULTS.promote_confidence,
        min=0.5,
        max=0.999,
        help="Level of the improvement's paired bootstrap interval.",
    ),
    min_test_examples: int = typer.Option(
        GATE_DEFAULTS.promote_min_test_examples,
        min=2,
        help="A candidate scored on fewer test examples cannot promote.",
    ),
    root: Path = typer.Option(Path("."), help=STORE_ROOT_HELP),
) -> None:
    """Move alias champion to VERSION only through the gate; exit 1 when the gate refuses.

    The gate compares the candidate with the champion on the same test examples (the
    champion re-scored when their data differ): the lower bound of the improvement's
    interval must clear the margin.
    """
    from peftflow.pipeline.gate import promote_with_evidence  # deferred: mlflow, torch
    from peftflow.tracking.runs import resolve_tracking_uri  # deferred: mlflow

    try:
        settings = TrackingConfig(
            promote_confidence=confidence, promote_min_test_examples=min_test_examples
        )
        uri = resolve_tracking_uri(None, root)
        decision = promote_with_evidence(model, version, uri, metric, margin, settings)
    except PeftflowError as err:
        fail(err)
    verdict = "promoted to champion" if decision.promoted else "NOT promoted"
    typer.echo(f"{model} v{version}: {verdict} ({decision.reason})")
    if not decision.promoted:
        raise typer.Exit(code=1)


def rollback(
    model: str = typer.Option(..., "--model", "-m", help="Registered model name."),
    root: Path = typer.Option(Path("."), help=STORE_ROOT_HELP),
) -> None:
    """Give alias champion back to the version that held it before (alias previous)."""
    from peftflow.tracking.promotion import rollback as rollback_champion  # deferred: mlflow
    from peftflow.tracking.runs import resolve_tracking_uri  # deferred: mlflow

    try:
        restored = rollback_champion(model, resolve_tracking_uri(None, root))
    except PeftflowError as err:
        fail(err)
    typer.echo(f"{model}: champion is v{restored} again")
