"""One study variant on whichever worker takes it: the study's data version, then training.

The study flow submits one flow run of the ``train-variant`` deployment per variant
(``peftflow study --deployment train-variant/train-variant``). The worker's checkout
never saw the data: the version the study ingested comes from the shared DVC remote by
its md5 (a version the remote lacks fails before training), the split and checks are
recomputed from it (deterministic: same md5 and config, same split), and the run lands
in MLflow under the study's parent run, where the study reads it back.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow

from flows import entry_point
from peftflow.pipeline.definition import on_data_version, run, variant_pipeline
from peftflow.pipeline.results import PipelineState, RunContext
from peftflow.pipeline.stages import outputs_dir
from peftflow.pipeline.study import plan_study, study_variant
from peftflow.tracking.runs import RunResult
from tasks.stages import run_as_task


@flow(name="train-variant")
def train_variant(
    study_path: str,
    variant: str,
    data_md5: str,
    parent_run_id: str,
    root: str = ".",
    force: bool = False,
) -> RunResult | None:
    """Train the study's ``variant`` on data version ``data_md5`` under ``parent_run_id``."""
    plan = plan_study(study_path)
    cfg = study_variant(plan, variant).config
    base = Path(root).resolve()
    ctx = RunContext(
        cfg,
        base,
        parent_run_id=parent_run_id,
        reports_name=f"study-{plan.study.name}-{variant}",
        entry_point=entry_point(__file__, "train_variant"),
    )
    work = outputs_dir(base) / "variants"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work, prefix=f"{variant}-") as scratch:
        pipeline = on_data_version(
            variant_pipeline(cfg, force), data_md5, Path(scratch) / "data", f"variant {variant}"
        )
        return run(pipeline, ctx, PipelineState(), call=run_as_task).trained
