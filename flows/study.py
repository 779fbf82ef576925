"""A study: shared ingest, checks and split -> baseline -> every variant nested -> report."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from peftflow.report import ReportHeader
from peftflow.study import (
    StudyPlan,
    StudyVariant,
    baseline_result,
    dotted,
    parent_run,
    plan_study,
    tokeniser_groups,
    tokeniser_key,
    variant_result,
)
from tasks import data, train
from tasks import study as study_tasks


@flow(name="study")
def study(
    study_path: str,
    root: str = ".",
    command: str | None = None,
    force: bool = False,
    remote_url: str | None = None,
) -> dict:
    """Run a study YAML; every variant is validated before any data is touched."""
    plan = plan_study(study_path)
    base = Path(root).resolve()
    ingested = data.ingest(plan.reference, base, remote_url)
    md5 = ingested["data_md5"]
    command = command or f"study(study_path={study_path!r}, root={root!r})"
    with parent_run(plan, md5, base, command) as parent:
        split_paths, checks = _shared_data_checks(plan, ingested, base)
        baseline = study_tasks.baseline(plan.reference, split_paths, md5, base, parent.run_id)
        results = [
            _run_variant(variant, split_paths, md5, checks, base, parent.run_id, force)
            for variant in plan.variants
        ]
        header = ReportHeader(
            study=plan.study.name,
            command=command,
            description=plan.study.description,
            budget=dotted(plan.study.budget),
            skipped_methods=plan.skipped_methods,
        )
        out_dir = base / "reports" / plan.study.name
        paths = study_tasks.report(header, results, baseline_result(baseline), out_dir)
        for path in paths:
            parent.log_artifact(path, "report")
        failed = [row["variant"] for row in results if row["status"] == "failed"]
        parent.set_tags({"peftflow.failed_variants": ",".join(failed) or "none"})
    return {
        "study": plan.study.name,
        "parent_run_id": parent.run_id,
        "data_md5": md5,
        "baseline": baseline,
        "results": results,
        "report_paths": paths,
        "failed": failed,
    }


def _shared_data_checks(
    plan: StudyPlan, ingested: dict, base: Path
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """One raw check, one split and leakage check, one tokenisation check per tokeniser.

    Returns the split paths and, per tokeniser key, the check reports its variants log.
    """
    reference, md5 = plan.reference, ingested["data_md5"]
    reports = base / "outputs" / "reports" / f"study-{plan.study.name}-{md5}"
    raw = data.validate_raw(reference, ingested["table_path"], reports)
    splits = data.split(reference, ingested["table_path"], md5, base)
    leakage = data.validate_splits(splits["paths"], reports)
    shared = raw["report_paths"] + leakage["report_paths"]
    checks = {}
    for key, config in tokeniser_groups(plan).items():
        tokens = data.check_tokenisation(config, splits["paths"], reports / key)
        checks[key] = shared + tokens["report_paths"]
    return splits["paths"], checks


def _run_variant(
    variant: StudyVariant,
    split_paths: dict[str, str],
    md5: str,
    checks: dict[str, list[str]],
    base: Path,
    parent_run_id: str,
    force: bool,
) -> dict:
    """Train one variant (or reuse its cached run); a failure is recorded, not fatal."""
    logger = get_run_logger()
    cfg = variant.config
    cached = None if force else train.find_cached_run(cfg, md5, base)
    if cached:
        logger.info("variant %s: run key already trained as run %s", variant.name, cached)
        return variant_result(variant, train.cached_run_summary(cfg, cached, base))
    report_paths = checks[tokeniser_key(cfg)]
    state = study_tasks.train_variant(
        cfg, split_paths, md5, report_paths, base, parent_run_id, return_state=True
    )
    if state.is_failed():
        error = state.result(raise_on_failure=False)
        logger.error("variant %s failed: %s", variant.name, error)
        return variant_result(variant, None, error=f"{type(error).__name__}: {error}")
    return variant_result(variant, state.result())
