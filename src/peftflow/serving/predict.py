"""Batch prediction over files with a registered or saved model, written atomically.

Depends on: data, tracking, task.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from peftflow.data.loaders import read_table_file
from peftflow.errors import DataError
from peftflow.serving.pyfunc import PeftflowModel
from peftflow.serving.trust import require_trusted
from peftflow.task.registry import load_trained
from peftflow.tracking.registration import (
    NOT_FOUND_CODES,
    download_logged_model,
    load_pyfunc_in_process,
)
from peftflow.tracking.runs import check_tracking_server

# --- files ------------------------------------------------------------------------------------

WRITERS = {
    ".csv": lambda frame, path: frame.to_csv(path, index=False),
    ".parquet": lambda frame, path: frame.to_parquet(path, index=False),
    ".jsonl": lambda frame, path: frame.to_json(path, orient="records", lines=True),
}


def read_input_table(path: Path, text_column: str) -> pd.DataFrame:
    """A CSV/JSONL/parquet file with a text in every row of ``text_column``.

    Any row without one (null, empty or only whitespace) refuses the whole file, naming the
    rows: a prediction for a blank text would look like an answer.
    """
    frame = read_table_file(Path(path), "input file", "--input")
    if text_column not in frame.columns:
        raise DataError(
            f"input {path} has no column {text_column!r} (columns: {list(frame.columns)}); "
            "pass --text-column with the column holding the texts"
        )
    if frame.empty:
        raise DataError(f"input {path} has no rows; nothing to predict")
    texts = frame[text_column]
    blank = texts.isna() | texts.astype(str).str.strip().eq("")
    if blank.any():
        rows = [int(row) + 1 for row in np.flatnonzero(blank.to_numpy())]
        listed = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        raise DataError(
            f"input {path}: column {text_column!r} has no text in {len(rows)} row(s) "
            f"(data rows {listed}, counted from 1); fill or drop those rows"
        )
    return frame


def output_writer(output_path: Path) -> Callable[[pd.DataFrame, Path], None]:
    """How ``output_path`` is written, by its suffix; refused before any prediction work."""
    writer = WRITERS.get(Path(output_path).suffix.lower())
    if writer is None:
        raise DataError(f"output {output_path}: use a {', '.join(WRITERS)} file name")
    return writer


def predict_file(
    predict_frame: Callable[[pd.DataFrame], pd.DataFrame],
    input_path: Path,
    output_path: Path,
    text_column: str = "text",
    batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """Input rows + prediction columns, batched with a progress bar, written atomically.

    ``predict_frame`` takes a DataFrame with a ``text`` column (an MLflow pyfunc's
    ``predict``) and returns one row per input row.
    """
    output_writer(output_path)
    frame = read_input_table(input_path, text_column)
    return predict_frame_to_file(
        predict_frame, frame, output_path, text_column, batch_size, progress
    )


def predict_frame_to_file(
    predict_frame: Callable[[pd.DataFrame], pd.DataFrame],
    frame: pd.DataFrame,
    output_path: Path,
    text_column: str = "text",
    batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """``frame`` (checked by read_input_table) + its predictions, written whole or not at all."""
    output_path, writer = Path(output_path), output_writer(output_path)
    texts = frame[text_column].astype(str)
    chunks = []
    batches = range(0, len(frame), batch_size)
    for start in tqdm(batches, desc="predict", unit="batch", disable=not progress):
        batch = pd.DataFrame({"text": texts.iloc[start : start + batch_size].tolist()})
        chunks.append(predict_frame(batch).reset_index(drop=True))
    predictions = pd.concat(chunks, ignore_index=True)
    result = pd.concat([frame.reset_index(drop=True), predictions], axis=1)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    staging = output_path.with_name(f".{output_path.name}.partial")
    try:
        writer(result, staging)
        os.replace(staging, output_path)  # a crash never leaves half an output file
    finally:
        staging.unlink(missing_ok=True)
    return output_path


def load_predictor(
    model: str, tracking_uri: str | None = None, trust_model: bool = False
) -> Callable:
    """``models:/NAME@alias`` / ``runs:/...`` through MLflow, or a saved model folder directly.

    A model from a store loads only if peftflow logged it, or with ``trust_model``
    (serving/trust.py): loading it runs the code stored with it.
    """
    folder = Path(model)
    if folder.is_dir():
        wrapper = PeftflowModel.from_loaded(load_trained(folder))
        return lambda frame: wrapper.predict(None, frame)
    if not model.startswith(("models:/", "runs:/")):
        raise DataError(
            f"--model {model!r} is neither a folder nor an MLflow URI; pass "
            "models:/NAME@champion, models:/NAME/VERSION, runs:/RUN_ID/model or a model folder"
        )
    import tempfile

    # The downloaded copy lives as long as the predictor (removed when it is garbage
    # collected or at exit), never left behind in the temp folder.
    scratch = tempfile.TemporaryDirectory(prefix="peftflow-model-")
    try:
        folder = download_model(model, tracking_uri, scratch.name)
        require_trusted(folder, model, trust_model)
        served = load_pyfunc_in_process(folder)
    except BaseException:
        scratch.cleanup()
        raise

    def predict(frame: pd.DataFrame, _keep=scratch) -> pd.DataFrame:
        return served.predict(frame)

    return predict


def download_model(uri: str, tracking_uri: str | None, target: str | Path | None = None) -> Path:
    """Fetch a registry/run model into ``target`` (default: a new temporary folder).

    An explicit client keeps MLflow's process-global tracking and registry URIs
    untouched (other code in the process, e.g. Prefect tasks, may use other stores).
    """
    import tempfile

    from mlflow.tracking import MlflowClient

    if tracking_uri:
        check_tracking_server(tracking_uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run_id, artifact_path, model_id = _model_artifact(client, uri)
    target = (
        Path(target) if target is not None else Path(tempfile.mkdtemp(prefix="peftflow-model-"))
    )
    if model_id:  # a LoggedModel: its artifacts live beside the run's, not in them
        return download_logged_model(client.tracking_uri, model_id, target)
    return Path(client.download_artifacts(run_id, artifact_path, str(target)))


def _model_artifact(client, uri: str) -> tuple[str, str, str | None]:
    """(run id, artifact path, LoggedModel id) behind models:/NAME@alias, models:/NAME/VERSION
    or runs:/ID/PATH. Models logged before LoggedModels are run artifacts (no model id)."""
    from mlflow.exceptions import MlflowException

    if uri.startswith("runs:/"):
        run_id, _, path = uri.removeprefix("runs:/").partition("/")
        return run_id, path or "model", _run_model_id(client, run_id)
    name_part = uri.removeprefix("models:/")
    try:
        if "@" in name_part:
            name, alias = name_part.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = name_part.partition("/")
            version = client.get_model_version(name, number)
    except MlflowException as err:
        if err.error_code not in NOT_FOUND_CODES:
            raise DataError(
                f"--model {uri}: the registry at {client.tracking_uri} failed to answer "
                f"({err.error_code}: {err.message}); check the tracking server and its logs"
            ) from None
        raise DataError(
            f"--model {uri}: not in the registry ({err.message}); check the name and the "
            "alias or version (`mlflow ui` lists them)"
        ) from None
    # MLflow's own registry stores no model id on a version: find the run's LoggedModel
    # stored where the version points.
    model_id = version.model_id or _logged_model_in(version.source)
    model_id = model_id or _run_model_id(client, version.run_id, version.source)
    return version.run_id, version.source.rstrip("/").rsplit("/", 1)[-1], model_id


def _logged_model_in(source: str) -> str | None:
    """The LoggedModel id of a version MLflow's own API registered (source ``models:/m-...``)."""
    reference = source.removeprefix("models:/")
    return reference if reference != source and reference.startswith("m-") else None


def _run_model_id(client, run_id: str, source: str | None = None) -> str | None:
    """The LoggedModel run ``run_id`` produced (the one stored at ``source`` when given, else
    its newest); None for a run logged before LoggedModels."""
    outputs = client.get_run(run_id).outputs
    models = sorted(outputs.model_outputs if outputs else [], key=lambda output: -output.step)
    for output in models:
        if source is None or client.get_logged_model(output.model_id).artifact_location == source:
            return output.model_id
    return None
