"""Data-parallel training: the train stage run by ``train.devices`` processes, one MLflow run.

Where ``train.devices`` is N > 1 the pipeline's training stage is replaced by
:func:`train_data_parallel`: it writes what the training needs (config, split,
check reports, baseline) to ``outputs/launch/<run key>/``, starts N processes with
``accelerate launch`` (one per GPU over NCCL; on a host without a visible GPU, N CPU
processes over gloo) running this module, and reads back the run they trained.
Rank 0 runs the ordinary train stage (the MLflow run, checkpoints, the saved model);
the other ranks train replicas and log nothing (:mod:`peftflow.training.replicas`).
Registration and promotion then continue in the calling process as for any run.

``train.batch_size`` stays the global batch, so a launch computes what one process
would (up to float summation order) and keeps its run key.

Depends on: config, training, tracking, task.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from peftflow.config import parse_config
from peftflow.errors import PeftflowError, TrainingError
from peftflow.fsutil import atomic_write_text
from peftflow.pipeline import stages
from peftflow.pipeline.results import (
    CheckOutcome,
    Ingested,
    PipelineState,
    RunContext,
    SplitResult,
)
from peftflow.task.registry import task_for
from peftflow.task.run import train_replica
from peftflow.tracking.runs import RunResult
from peftflow.training.replicas import data_parallel

SPEC_FILE, RESULT_FILE = "spec.json", "result.json"
ERROR_FILES = "error-rank*.json"  # a failing rank's reason (rank 0 may be stopped before its own)
CHECK_SLOTS = ("raw_check", "split_check", "token_check")


def train_data_parallel(ctx: RunContext, state: PipelineState) -> RunResult:
    """Launch ``train.devices`` processes for the train stage; the run rank 0 trained."""
    folder = stages.outputs_dir(ctx.root) / "launch" / ctx.cfg.run_key(state.data_md5)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [folder / RESULT_FILE, *folder.glob(ERROR_FILES)]:
        stale.unlink(missing_ok=True)
    atomic_write_text(folder / SPEC_FILE, json.dumps(_spec(ctx, state), indent=1))
    done = subprocess.run(launch_command(ctx.cfg.train.devices, folder), cwd=ctx.root)
    return _collect(folder, done.returncode, ctx.cfg.train.devices)


def launch_command(processes: int, folder: Path) -> list[str]:
    """``accelerate launch`` of this module on ``processes`` processes of this host."""
    return [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"),
        *("--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", str(_free_port())),
        *("-m", "peftflow.pipeline.launch", str(folder)),
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spec(ctx: RunContext, state: PipelineState) -> dict:
    """Everything rank 0 needs to run the train stage exactly as this process would."""
    return {
        "config": ctx.cfg.model_dump(mode="json"),
        "root": str(ctx.root),
        "parent_run_id": ctx.parent_run_id,
        "extra_tags": dict(ctx.extra_tags),
        "data_md5": state.data_md5,
        "split": asdict(state.split),
        "checks": {
            slot: asdict(getattr(state, slot)) for slot in CHECK_SLOTS if state.filled(slot)
        },
        "baseline": asdict(state.baseline) if state.baseline else None,
    }


def _collect(folder: Path, returncode: int, processes: int) -> RunResult:
    """The run rank 0 recorded; a TrainingError with the ranks' reasons when the launch failed."""
    result = folder / RESULT_FILE
    if returncode == 0 and result.is_file():
        data = json.loads(result.read_text())
        return RunResult(**{**data, "history": tuple(data["history"])})
    reasons: dict[str, list[str]] = {}
    for error in sorted(folder.glob(ERROR_FILES)):
        failure = json.loads(error.read_text())
        reasons.setdefault(failure["error"], []).append(str(failure["rank"]))
    reason = "; ".join(f"rank {', '.join(ranks)}: {why}" for why, ranks in reasons.items())
    raise TrainingError(
        f"the data-parallel launch of {processes} processes failed (exit {returncode}): "
        f"{reason or 'see its output above'}"
    )


# --- in each launched process -------------------------------------------------------------------


def main(folder: Path) -> int:
    """One rank of a launch: rank 0 runs the train stage and writes the run, others replicate."""
    spec = json.loads((folder / SPEC_FILE).read_text())
    ctx, state = _context(spec), _state(spec)
    replicas = data_parallel(ctx.cfg.train.device)
    if replicas is None:
        raise PeftflowError(
            "peftflow.pipeline.launch runs under a launcher, one process per rank: set "
            "train.devices to N and run the pipeline (`peftflow run ... --set train.devices=N`)"
        )
    try:
        if not replicas.is_main:
            train_replica(task_for(ctx.cfg), ctx.cfg, stages.load_splits(state.split.paths))
            return 0
        trained = stages.train(ctx, state)
    except Exception as err:  # the launching process reports why, whatever the error
        failure = {"rank": replicas.rank, "error": f"{type(err).__name__}: {err}"}
        atomic_write_text(folder / f"error-rank{replicas.rank}.json", json.dumps(failure))
        raise
    atomic_write_text(folder / RESULT_FILE, json.dumps(asdict(trained)))
    return 0


def _context(spec: dict) -> RunContext:
    return RunContext(
        cfg=parse_config(spec["config"], source="data-parallel launch spec"),
        root=Path(spec["root"]),
        parent_run_id=spec["parent_run_id"],
        extra_tags=spec["extra_tags"],
    )


def _state(spec: dict) -> PipelineState:
    """The results the train stage reads: the data version, split, check reports, baseline."""
    checks = {
        slot: CheckOutcome(check["suite"], tuple(check["report_paths"]), check["observed"])
        for slot, check in spec["checks"].items()
    }
    baseline = spec["baseline"]
    return PipelineState(
        ingested=Ingested(spec["data_md5"], "", 0, {}, ""),  # training reads only its md5
        split=SplitResult(**spec["split"]),
        baseline=RunResult(**{**baseline, "history": ()}) if baseline else None,
        **checks,
    )


if __name__ == "__main__":
    try:
        code = main(Path(sys.argv[1]))
    except PeftflowError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sys.exit(code)
