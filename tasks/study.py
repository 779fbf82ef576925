"""Study tasks: the report, and the process pool that trains variants side by side.

The variants' stages are the pipeline's own tasks (``tasks/stages.py``); their training
tasks carry the tag ``peftflow-train``, so a Prefect tag concurrency limit caps how many
train at once across every flow on the server, on top of each study's ``max_parallel``.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import torch
from mlflow import MlflowClient
from prefect import task

from peftflow.pipeline.study import REPORT_METRICS, StudyConfig
from peftflow.pipeline.study_evidence import (
    compare_with_baseline,
    mlflow_outputs,
    question_evidence,
    with_logged_metrics,
)
from peftflow.reporting.study_report import ReportHeader, write_report


@task(name="write-study-report")
def report(
    header: ReportHeader, results: list[dict], baseline: dict | None, evidence: dict, out_dir: Path
) -> list[str]:
    return [str(path) for path in write_report(header, results, baseline, out_dir, evidence)]


@task(name="compare-study-variants")
def evidence(
    study: StudyConfig, rows: list[dict], baseline: dict, tracking_uri: str
) -> tuple[list[dict], dict]:
    """Rows completed from their MLflow runs, and every question's paired comparisons."""
    client = MlflowClient(tracking_uri)
    rows = with_logged_metrics(rows, client, REPORT_METRICS)
    outputs_of = mlflow_outputs(client)
    return rows, {
        "questions": question_evidence(study, rows, outputs_of),
        "baseline": compare_with_baseline(rows, baseline, outputs_of),
    }


# --- the process pool of a concurrent study ----------------------------------------------


def worker_setup_args(workers: int) -> tuple[int, object]:
    """``setup_worker``'s arguments for a pool of ``workers`` processes.

    CPU threads are shared out (at least one each); with two or more visible GPUs
    each process takes its own (round robin when there are more processes than GPUs).
    """
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
    torch.set_num_threads(threads)
    if gpu_slots is not None:
        torch.cuda.set_device(gpu_slots.get(timeout=60))
