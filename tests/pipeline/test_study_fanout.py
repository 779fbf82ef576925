"""Study fan-out: variants as concurrent task runs in a bounded process pool."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from prefect import flow, task

from peftflow.errors import ConfigError
from peftflow.pipeline.study import load_study, study_identity, variant_parallelism
from tasks import stages as stage_tasks
from tasks import study as study_tasks
from tests.conftest import synthetic_spam_table
from tests.pipeline.test_study import variant, write_study


def test_max_parallel_defaults_to_one_variant_at_a_time_without_gpus(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    study = load_study(write_study(tmp_path, {"variants": [variant("a", "q")]}))
    assert study.max_parallel is None and variant_parallelism(study.max_parallel) == 1
    assert variant_parallelism(3) == 3
    with pytest.raises(ConfigError, match="max_parallel must be 1 or more"):
        variant_parallelism(0)


def test_max_parallel_defaults_to_one_variant_per_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert variant_parallelism(None) == 4
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert variant_parallelism(None) == 1  # one GPU: variants share it only when asked


def test_max_parallel_is_validated_and_not_part_of_the_study_identity(tmp_path):
    with pytest.raises(ConfigError, match="max_parallel"):
        load_study(
            write_study(tmp_path / "a", {"variants": [variant("a", "q")], "max_parallel": 0})
        )
    one = load_study(write_study(tmp_path / "b", {"variants": [variant("a", "q")]}))
    two = one.model_copy(update={"max_parallel": 2})
    other = one.model_copy(update={"description": "another study"})
    assert study_identity(one) == study_identity(two) != study_identity(other)


def test_workers_share_the_cpu_threads_and_take_one_gpu_each(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert study_tasks.worker_setup_args(3) == (2, None)
    assert study_tasks.worker_setup_args(16)[0] == 1

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    threads, slots = study_tasks.worker_setup_args(3)
    assert threads == 2 and [slots.get(timeout=5) for _ in range(3)] == [0, 1, 0]
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    slots.put(1)
    study_tasks.setup_worker(1, slots)
    assert chosen == [1] and torch.get_num_threads() == 1
    torch.set_num_threads(before)


def test_training_task_runs_carry_the_concurrency_tag():
    assert stage_tasks.TRAIN_TAG in stage_tasks.train.tags
    assert stage_tasks.TRAIN_TAG in stage_tasks.train_data_parallel.tags


@task(name="rendezvous")
def rendezvous(name: str, variants: int, root: str) -> int:
    """A stand-in for a variant's training task: the most variants it saw training at once.

    It waits (up to two minutes) until two variants are training at once, or until every
    variant has begun, so a pool of two must hold two at once however slowly it starts.
    """
    folder = Path(root)
    (folder / "started" / name).touch()
    (folder / "running" / name).touch()
    seen = len(list((folder / "running").iterdir()))
    deadline = time.monotonic() + 120  # a second worker process may start slowly
    while time.monotonic() < deadline:
        running = len(list((folder / "running").iterdir()))
        started = len(list((folder / "started").iterdir()))
        if running >= 2 or started == variants:
            break
        time.sleep(0.05)
    seen = max(seen, running)
    (folder / "running" / name).unlink()
    return seen


@pytest.mark.slow
@pytest.mark.server
def test_the_pool_trains_exactly_max_parallel_variants_at_once(
    prefect_server, tmp_path, monkeypatch
):
    from flows import study as study_flow

    names = ["a", "b", "c"]
    for folder in ("started", "running"):
        (tmp_path / folder).mkdir()
    jobs = [
        (rendezvous, {"name": name, "variants": len(names), "root": str(tmp_path)})
        for name in names
    ]

    @flow
    def pool_of_two() -> list[int]:
        states = study_flow._train_concurrently(jobs, parallel=2)
        return [state.result() for state in states]

    seen = pool_of_two()
    assert max(seen) == 2  # two trained at once, never three
    assert sorted(path.name for path in (tmp_path / "started").iterdir()) == names


def broken_copy(model_dir: Path, folder: Path) -> Path:
    """The model folder with unreadable weights: it passes every check, then fails to load."""
    shutil.copytree(model_dir, folder)
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    return folder


def overlaps(runs) -> int:
    """The most MLflow runs that were running at the same moment."""
    events = sorted(
        [(run.info.start_time, 1) for run in runs] + [(run.info.end_time, -1) for run in runs]
    )
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


@pytest.mark.slow
@pytest.mark.server
def test_study_trains_variants_concurrently_in_order_and_records_a_failure(
    prefect_server, tiny_models, tmp_path
):
    from mlflow.tracking import MlflowClient

    from flows.study import study

    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    synthetic_spam_table(240)[["text", "label"]].to_csv(root / "messages.csv", index=False)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    broken = broken_copy(tiny_models["llama"], tmp_path / "broken-llama")
    base = {
        "name": "base",
        "seed": 3,
        "data": {"source": "table", "path": str(root / "messages.csv"), "min_class_fraction": 0.1},
        "model": {"name": str(tiny_models["llama"]), "max_length": 48},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"epochs": 2, "batch_size": 16, "lr": 5e-3, "progress": False},
        "tracking": {"experiment": "fanout", "tracking_uri": uri, "register_model": False},
    }
    plan = {
        "name": "fanout",
        "max_parallel": 2,
        "budget": {"data.split.max_train_examples": 120},
        "variants": [
            variant("last", "Last or first token?", **{"model.pooling": "last"}),
            variant("broken", "Does a failure stop the study?", **{"model.name": str(broken)}),
            variant("first", "Last or first token?", **{"model.pooling": "first"}),
        ],
    }
    study_path = write_study(tmp_path / "configs", plan, base)

    summary = study(study_path=str(study_path), root=str(root), command="peftflow study x")

    rows = summary.results
    assert summary.max_parallel == 2
    assert [row["variant"] for row in rows] == ["last", "broken", "first"]  # the plan's order
    assert [row["status"] for row in rows] == ["trained", "failed", "trained"]
    assert summary.failed == ["broken"] and "SafetensorError" in rows[1]["error"]
    assert all(row["test_f1"] is not None for row in (rows[0], rows[2]))

    client = MlflowClient(uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.tags["peftflow.failed_variants"] == "broken"
    assert parent.data.tags["peftflow.max_parallel"] == "2"
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`peftflow.kind` = 'finetune'",
    )
    by_name = {run.info.run_name: run for run in children}
    assert set(by_name) == {"fanout-last", "fanout-broken", "fanout-first"}
    assert by_name["fanout-broken"].info.status == "FAILED"
    # Never three at once. That two do train at once is proven without timing luck by
    # test_the_pool_trains_exactly_max_parallel_variants_at_once: here a worker that
    # starts late on a loaded machine may find the other variant already done.
    assert overlaps(children) <= 2
    outputs = {
        row["run_id"]: Path(by_name[f"fanout-{row['variant']}"].data.tags["peftflow.model_dir"])
        for row in (rows[0], rows[2])
    }
    assert all(path.parent.name == run_id for run_id, path in outputs.items())  # own folders

    # Again: both trained variants come from the cache, only the broken one is retried.
    again = study(study_path=str(study_path), root=str(root), command="peftflow study x")
    assert [row["status"] for row in again.results] == ["cached", "failed", "cached"]


def test_an_unknown_deployment_is_refused_before_any_data_is_touched(
    prefect_server, tmp_path, monkeypatch
):
    from flows.study import study

    study_path = write_study(tmp_path, {"variants": [variant("only", "Does it run?")]})
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ValueError, match="no deployment 'train-variant/nope'.*prefect deploy"):
        study(study_path=str(study_path), root=str(tmp_path), deployment="train-variant/nope")
    assert not (tmp_path / "data").exists() and not (tmp_path / "data.dvc").exists()
