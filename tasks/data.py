"""Data stages: ingestion (retried: it fetches), checks and the split."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from peftflow import pipeline
from peftflow.config import ExperimentConfig
from peftflow.errors import DataCheckError, FetchError, PeftflowError


def publish_failed_report(stage: Callable[..., dict]) -> Callable[..., dict]:
    """Show a failed suite's report in the Prefect UI (it is also on disk), then re-raise."""

    @wraps(stage)
    def wrapper(*args, **kwargs) -> dict:
        try:
            return stage(*args, **kwargs)
        except DataCheckError as err:
            suite = err.report.get("suite", "data-checks")
            create_markdown_artifact(
                key=f"failed-{suite}".replace("_", "-"),
                markdown=f"# {suite} failed\n\n```\n{err}\n```",
                description=f"Great Expectations suite {suite} failed",
            )
            raise

    return wrapper


def retry_only_fetch_failures(task, task_run, state) -> bool:
    """Retry a failed download (network, registry); bad data or config fails at once."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, FetchError) or not isinstance(error, PeftflowError)


@task(
    name="ingest",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_only_fetch_failures,
)
@publish_failed_report
def ingest(cfg: ExperimentConfig, root: Path, remote_url: str | None = None) -> dict:
    """Fetch and DVC-track the data; the raw-data suite refuses bad data before tracking."""
    return pipeline.ingest_stage(cfg, root, remote_url)


@task(name="validate-raw-data")
@publish_failed_report
def validate_raw(cfg: ExperimentConfig, table_path: str, report_dir: Path) -> dict:
    return pipeline.validate_raw_stage(cfg, table_path, report_dir)


def _split_cache_key(context, parameters: dict) -> str:
    return pipeline.split_cache_key(parameters["cfg"], parameters["data_md5"], parameters["root"])


# Cacheable: the result (paths + summary, JSON, never a DataFrame) is persisted by Prefect.
@task(name="split", persist_result=True, result_serializer="json", cache_key_fn=_split_cache_key)
def _split(cfg: ExperimentConfig, table_path: str, data_md5: str, root: Path) -> dict:
    return pipeline.split_stage(cfg, table_path, data_md5, root)


def split(cfg: ExperimentConfig, table_path: str, data_md5: str, root: Path, **options):
    """The split task; its persisted result is reused only while the files it names exist."""
    fresh = not pipeline.split_written(cfg, data_md5, root)
    return _split.with_options(refresh_cache=fresh)(cfg, table_path, data_md5, root, **options)


@task(name="validate-splits")
@publish_failed_report
def validate_splits(split_paths: dict[str, str], report_dir: Path) -> dict:
    return pipeline.validate_splits_stage(split_paths, report_dir)


@task(name="check-tokenisation")
def check_tokenisation(
    cfg: ExperimentConfig, split_paths: dict[str, str], report_dir: Path
) -> dict:
    return pipeline.tokenisation_stage(cfg, split_paths, report_dir)
