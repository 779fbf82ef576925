"""A study fanned out to workers on other machines (flows/study.py with ``deployment``).

All on 127.0.0.1: the stack of `make up` (Postgres, the S3 store, MLflow, Prefect) and two
process workers, each in its own clone of this repository with its own DVC cache and
outputs: nothing is shared but the servers. One worker is killed in the middle of a
variant, as a lost machine would be.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import build_tiny_model_dir, synthetic_spam_table
from tests.servers import local_stack, stop_process_group, tail

REPO = Path(__file__).resolve().parents[2]
STUDY = "study/tiny.yaml"  # where the study sits in every checkout, as if committed
VARIANTS = ("last", "first", "mean", "bert")
DEPLOYMENT = "train-variant/train-variant"
HEARTBEAT_S = 30  # Prefect's minimum: the lost worker's variant is marked Crashed ~75 s later


def checkout(folder: Path, models: Path) -> Path:
    """A clone of this repository with the study, its base config and the tiny models."""
    subprocess.run(["git", "clone", "-q", str(REPO), str(folder)], check=True)
    shutil.copytree(models, folder / "models")
    (folder / "study").mkdir()
    base = {
        "name": "base",
        "seed": 3,
        "data": {"source": "table", "path": "messages.csv", "min_class_fraction": 0.1},
        "model": {"name": "models/llama", "max_length": 48},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"epochs": 1, "batch_size": 16, "lr": 5e-3, "progress": False},
        "tracking": {"experiment": "workers", "register_model": False},
    }
    study = {
        "name": "tiny",
        "base": "base.yaml",
        "budget": {"data.split.max_train_examples": 96},
        "variants": [
            {"name": "last", "question": "Last or first token?", "overrides": {}},
            {
                "name": "first",
                "question": "Last or first token?",
                "overrides": {"model.pooling": "first"},
            },
            {"name": "mean", "question": "Pooling?", "overrides": {"model.pooling": "mean"}},
            {
                "name": "bert",
                "question": "BERT-style vs GPT-style?",
                "overrides": {"model.name": "models/bert", "method.name": "full"},
            },
        ],
    }
    (folder / "study" / "base.yaml").write_text(yaml.safe_dump(base))
    (folder / STUDY).write_text(yaml.safe_dump(study))
    return folder


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (a worker's flow-run processes), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def kill_machine(worker: subprocess.Popen) -> None:
    """SIGKILL the worker and everything it started: nothing is left to report anything."""
    for pid in [worker.pid, *descendants(worker.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def first_running_variant(client) -> str | None:
    """The name of a train-variant flow run that is Running, if any."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    running_state = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
    running = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=running_state))
    names = [run.parameters.get("variant") for run in running if "variant" in run.parameters]
    return names[0] if names else None


@pytest.mark.server
@pytest.mark.slow
def test_a_study_fans_out_to_two_workers_and_survives_losing_one(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.study import study

    models = tmp_path / "models"
    for kind in ("llama", "bert"):
        build_tiny_model_dir(kind, models / kind)
    laptop, doomed, survivor = (
        checkout(tmp_path / name, models) for name in ("laptop", "worker-a", "worker-b")
    )
    # The study's own table exists only where the study runs (its ingest pushes it).
    synthetic_spam_table(200)[["text", "label"]].to_csv(laptop / "messages.csv", index=False)

    with local_stack(tmp_path) as clients:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))},
            **clients,
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        for name, value in clients.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))
        deploy = subprocess.run(
            [sys.executable, "-m", "prefect", "deploy", "-n", "train-variant", "--no-prompt"],
            cwd=laptop,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr

        def worker(folder: Path, limit: int) -> subprocess.Popen:
            """A process worker whose flow runs start in ``folder`` (prefect.yaml's pull step)."""
            command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu"]
            command += ["--type", "process", "--limit", str(limit)]
            with open(tmp_path / f"{folder.name}.log", "wb") as log:
                return subprocess.Popen(
                    command,
                    cwd=folder,
                    env={**env, "PEFTFLOW_ROOT": str(folder)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

        lost: dict[str, str] = {}
        started = [worker(doomed, limit=1)]  # it takes one variant, then is lost

        def lose_worker_a_then_start_b() -> None:
            """Worker A takes the first variant; in the middle of it A's machine is gone; then
            worker B starts and takes the rest."""
            with (  # settings are per thread: name this thread's API too
                temporary_settings({PREFECT_API_URL: clients["PREFECT_API_URL"]}),
                get_client(sync_client=True) as client,
            ):
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline and "variant" not in lost:
                    name = first_running_variant(client)
                    if name is not None:
                        # Into the variant's stages (its first heartbeat is sent as it starts),
                        # well before its end: a tiny variant takes about 8 s on a fast CPU.
                        time.sleep(2)
                        kill_machine(started[0])
                        lost["variant"] = name
                    time.sleep(0.5)
            started.append(worker(survivor, limit=2))  # the rest, two at a time

        chaos = threading.Thread(target=lose_worker_a_then_start_b)
        try:
            with temporary_settings({PREFECT_API_URL: clients["PREFECT_API_URL"]}):
                chaos.start()
                monkeypatch.chdir(laptop)
                outcome = study(study_path=STUDY, root=str(laptop), deployment=DEPLOYMENT)
        finally:
            chaos.join(timeout=400)
            for process in started:
                stop_process_group(process)
        logs = tail(tmp_path / "worker-a.log") + tail(tmp_path / "worker-b.log")

        assert "variant" in lost, f"worker A never ran a variant:\n{logs}"
        rows = {row["variant"]: row for row in outcome.results}
        assert list(rows) == list(VARIANTS)  # the plan's order
        assert rows[lost["variant"]]["status"] == "crashed", rows[lost["variant"]]
        assert "heartbeats" in rows[lost["variant"]]["error"]
        others = [name for name in VARIANTS if name != lost["variant"]]
        assert [rows[name]["status"] for name in others] == ["trained"] * 3, logs
        assert all(rows[name]["test_f1"] is not None for name in others)
        assert outcome.failed == [lost["variant"]]

        # Every result is in the MLflow server, under the study's parent run, once.
        store = MlflowClient(clients["MLFLOW_TRACKING_URI"])
        parent = store.get_run(outcome.parent_run_id)
        assert parent.data.tags["peftflow.variants_on"] == DEPLOYMENT
        children = store.search_runs(
            [parent.info.experiment_id],
            f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
            "and tags.`peftflow.kind` = 'finetune' and attributes.status = 'FINISHED'",
        )
        assert sorted(run.info.run_name for run in children) == sorted(f"tiny-{n}" for n in others)
        assert {rows[n]["run_id"] for n in others} == {run.info.run_id for run in children}
        assert store.search_registered_models() == []  # study variants never register

        # The survivor trained from the object store: its own cache holds the study's data.
        manifest = outcome.data_md5.removesuffix(".dir")
        assert list((survivor / ".dvc" / "cache").rglob(f"{manifest[2:]}.dir"))
        assert not (survivor / "data").exists() and not (survivor / "messages.csv").exists()
        report = (laptop / "reports" / "tiny" / "report.md").read_text()
        assert "crashed: flow run Crashed" in report
