"""One experiment end to end: the pipeline's stages (peftflow.pipeline.definition) as tasks."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows import entry_point
from peftflow.config import load_config
from peftflow.pipeline.definition import finetune_pipeline, run
from peftflow.pipeline.results import Ingested, PipelineState, RunContext
from tasks.stages import run_as_task


@flow(name="finetune")
def finetune(
    config_path: str,
    root: str = ".",
    overrides: dict | None = None,
    remote_url: str | None = None,
    run_baseline: bool = True,
    force: bool = False,
    ingested: Ingested | None = None,
) -> PipelineState:
    """Run one experiment config end to end; an unchanged run key is served from cache.

    ``ingested`` is a data version a caller already ingested for this config's data (the
    refresh flow, for several configs): then this config's raw-data checks run on it
    instead of a new ingest.
    """
    cfg = load_config(config_path, overrides)
    ctx = RunContext(
        cfg, Path(root).resolve(), remote_url, entry_point=entry_point(__file__, "finetune")
    )
    pipeline = finetune_pipeline(cfg, baseline=run_baseline, force=force)
    return run(pipeline, ctx, PipelineState(ingested=ingested), call=run_as_task)
