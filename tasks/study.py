"""Study stages: a variant's training nested under the study's run, the baseline, the report.

``train-variant`` runs carry the tag ``peftflow-train``: a Prefect tag concurrency limit
(``prefect concurrency-limit create peftflow-train 4``) caps how many train at once
across every study flow on the server, on top of each study's ``max_parallel``.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from prefect import task

from peftflow import pipeline
from peftflow.config import ExperimentConfig
from peftflow.report import ReportHeader, write_report
from tasks.train import TRAIN_TIMEOUT_SECONDS

TRAIN_TAG = "peftflow-train"


@task(name="train-variant", timeout_seconds=TRAIN_TIMEOUT_SECONDS, tags=[TRAIN_TAG])
def train_variant(
    cfg: ExperimentConfig,
    split_paths: dict[str, str],
    data_md5: str,
    report_paths: list[str],
    root: Path,
    parent_run_id: str,
) -> dict:
    return pipeline.train_stage(cfg, split_paths, data_md5, report_paths, root, parent_run_id)


@task(name="baseline")
def baseline(
    cfg: ExperimentConfig,
    split_paths: dict[str, str],
    data_md5: str,
    root: Path,
    parent_run_id: str,
) -> dict:
    return pipeline.baseline_stage(cfg, split_paths, data_md5, root, parent_run_id)


@task(name="write-study-report")
def report(
    header: ReportHeader, results: list[dict], baseline: dict | None, out_dir: Path
) -> list[str]:
    return [str(path) for path in write_report(header, results, baseline, out_dir)]


# --- the process pool of a concurrent study ----------------------------------------------


def worker_setup_args(workers: int) -> tuple[int, object]:
    """``setup_worker``'s arguments for a pool of ``workers`` processes.

    CPU threads are shared out (at least one each); with two or more visible GPUs
    each process takes its own (round robin when there are more processes than GPUs).
    """
    import torch

    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        return threads, None
    slots = multiprocessing.get_context("spawn").Queue()
    for worker in range(workers):
        slots.put(worker % gpus)
    return threads, slots


def setup_worker(threads: int, gpu_slots) -> None:
    """Run once in each pool process: its torch threads and, with several GPUs, its GPU.

    A variant's own ``train.threads`` still wins inside its process.
    """
    import torch

    torch.set_num_threads(threads)
    if gpu_slots is not None:
        torch.cuda.set_device(gpu_slots.get(timeout=60))
