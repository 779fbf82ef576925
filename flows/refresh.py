"""The scheduled refresh: re-ingest -> only if the DVC md5 is new: every variant's finetune flow.

Deployed from ``prefect.yaml`` with a nightly cron; the logic (the md5 comparison, the
state kept as an MLflow run of kind ``refresh``) is in :mod:`peftflow.pipeline.refresh`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows import entry_point
from flows.finetune import finetune
from peftflow.pipeline.definition import FULL, run
from peftflow.pipeline.refresh import plan_refresh, run_refresh
from peftflow.pipeline.results import RunContext
from tasks.stages import run_as_task


@flow(name="refresh")
def refresh(
    config_paths: list[str],
    root: str = ".",
    remote_url: str | None = None,
    force: bool = False,
) -> dict:
    """Re-ingest the data; when its md5 changed since the last successful refresh of these
    configs (or ``force``), run the finetune flow for every config as a subflow: each
    re-validates, trains (an unchanged run key is served from cache), registers and
    promotes through the gate. Unchanged data trains nothing and says so.
    """
    base = Path(root).resolve()
    plan = plan_refresh(config_paths, base)
    ctx = RunContext(plan.reference, base, remote_url, entry_point=entry_point(__file__, "refresh"))
    return run_refresh(
        plan,
        base,
        ingest=lambda: run(FULL.only("ingest"), ctx, call=run_as_task).ingested,
        train_variant=lambda path, ingested: finetune(
            config_path=path, root=str(base), remote_url=remote_url, ingested=ingested
        ),
        force=force,
        logger=get_run_logger(),
    )
