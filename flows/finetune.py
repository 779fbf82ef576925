"""ingest -> check data -> split -> check splits and tokens -> train -> register -> promote."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from peftflow.config import load_config
from peftflow.pipeline import check_reports_dir
from tasks import data, registry, train


@flow(name="finetune")
def finetune(
    config_path: str,
    root: str = ".",
    overrides: dict | None = None,
    remote_url: str | None = None,
    run_baseline: bool = True,
    force: bool = False,
    ingested: dict | None = None,
) -> dict:
    """Run one experiment config end to end; an unchanged run key is served from cache.

    ``ingested`` is the ingest result of a caller that already ingested this config's data
    (the refresh flow, for several configs); without it the flow ingests itself.
    """
    logger = get_run_logger()
    cfg = load_config(config_path, overrides)
    train.preflight(cfg)  # a method, model or machine that cannot work: refused before any work
    base = Path(root).resolve()
    if ingested is None:  # the raw-data suite gates the ingest: bad data is never tracked
        ingested = data.ingest(cfg, base, remote_url)
        raw = {"report_paths": ingested["raw_report_paths"]}
    else:  # ingested for another config: check the data against this config's bounds
        reports = check_reports_dir(cfg, base, ingested["data_md5"])
        raw = data.validate_raw(cfg, ingested["table_path"], reports)
    md5 = ingested["data_md5"]
    reports = check_reports_dir(cfg, base, md5)
    splits = data.split(cfg, ingested["table_path"], md5, base)
    leakage = data.validate_splits(splits["paths"], reports)
    tokens = data.check_tokenisation(cfg, splits["paths"], reports)
    summary = {
        "config": cfg.name,
        "task": cfg.task,
        "run_key": cfg.run_key(md5),
        "data": ingested,
        "split": splits,
    }
    if run_baseline:
        summary["baseline"] = train.baseline(cfg, splits["paths"], md5, base)
    cached = None if force else train.find_cached_run(cfg, md5, base)
    if cached:
        logger.info(
            "run key %s already trained as run %s: nothing to train", cfg.run_key(md5), cached
        )
        summary["finetune"] = train.cached_run_summary(cfg, cached, base)
        return summary
    report_paths = raw["report_paths"] + leakage["report_paths"] + tokens["report_paths"]
    result = train.train_and_evaluate(
        cfg, splits["paths"], md5, report_paths, base, summary.get("baseline")
    )
    summary["finetune"] = result
    if cfg.tracking.register_model:
        version = registry.register(
            cfg, result["run_id"], result["model_dir"], base, splits["paths"]["test"]
        )
        summary["registered"] = version
        summary["promotion"] = registry.promote(cfg, version["name"], version["version"], base)
    return summary
