"""Runs that finish at once: each gets its own version, and promotion keeps one champion.

Registration and promotion are driven from threads and from separate processes against
one real ``mlflow server`` (SQLite backend) on 127.0.0.1, all released together by a
barrier. Promotions must end exactly as some one-after-another order of them would: the
decisions recorded in the description, replayed in their order through the gate, give
every decision, ``champion`` (the best metric) and ``previous``. The registry lock and the
transient-error retries are unit-tested on a throwaway SQLite store.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST, TEMPORARILY_UNAVAILABLE

from peftflow import retry
from peftflow.errors import RegistryError
from peftflow.retry import retry_transient
from peftflow.tracking.locks import (
    LOCK_TAG,
    LockTimeout,
    RegistryLock,
    is_lock_model,
    lock_model_name,
)
from peftflow.tracking.promotion import (
    DECISION_TAG,
    GATE_TAGS,
    promote,
    promote_if_better,
    rollback,
)
from peftflow.tracking.registration import log_and_register_model, register_version
from peftflow.tracking.runs import RunTracker, ensure_experiment
from tests.tracking.test_registry import KeywordModel

N = 6
# test_f1 of run i: the best (0.90) is neither first nor last, and no two are equal.
METRICS = [0.60, 0.70, 0.90, 0.50, 0.80, 0.65]
REPO = Path(__file__).resolve().parents[2]
CHILD_START_TIMEOUT_S = 120
DECISION_LINE = re.compile(r"^\S+ v(\d+) (promoted|refused|rolled_back): ")


def unique(name: str) -> str:
    """A model name of its own: the session's server is shared with other tests."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def make_runs(uri: str, root: Path, metrics: list[float]) -> list[str]:
    """Finished runs that passed every gate check, one per ``test_f1`` value."""
    experiment_id = ensure_experiment("concurrency", uri, root)
    run_ids = []
    for i, value in enumerate(metrics):
        with RunTracker(uri) as tracker:
            run_ids.append(tracker.start(experiment_id, f"run-{i}", tags=GATE_TAGS, params={}))
            tracker.log_metrics({"test_f1": value}, step=0)
    return run_ids


def all_at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` in threads released together by a barrier; results in call order."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        barrier.wait(timeout=60)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def in_processes(code: str, argv: list[list[str]], folder: Path) -> list[dict]:
    """Run ``code`` in one Python process per argv, released together; their JSON outputs.

    Each child gets READY and GO file paths after its own arguments: it imports what it
    needs, touches READY, waits for GO, then does its one registry call.
    """
    folder.mkdir(parents=True, exist_ok=True)
    go = folder / "go"
    readies = [folder / f"ready-{i}" for i in range(len(argv))]
    env = {"PYTHONPATH": f"{REPO / 'src'}:{REPO}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, *args, str(ready), str(go)],
            cwd=REPO,
            env={**_base_env(), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, ready in zip(argv, readies, strict=True)
    ]
    try:
        _wait_ready(children, readies)
        go.touch()
        outputs = [child.communicate(timeout=90) for child in children]
    finally:
        for child in children:
            child.kill()
    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, f"child failed ({child.returncode}):\n{err[-3000:]}"
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def _wait_ready(children: list[subprocess.Popen], readies: list[Path]) -> None:
    deadline = time.monotonic() + CHILD_START_TIMEOUT_S
    while not all(ready.exists() for ready in readies):
        for child in children:
            if child.poll() is not None:
                pytest.fail(f"child exited early:\n{child.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"children not ready after {CHILD_START_TIMEOUT_S} s")
        time.sleep(0.1)


CHILD_PRELUDE = """
import dataclasses, json, sys, time
from pathlib import Path
from mlflow import MlflowClient
from peftflow.tracking.promotion import promote
from peftflow.tracking.registration import register_version
*args, ready, go = sys.argv[1:]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)
"""
REGISTER_CHILD = (
    CHILD_PRELUDE
    + """
uri, model, run_id = args
client = MlflowClient(uri, registry_uri=uri)
info = register_version(client, model, f"runs:/{run_id}/model", run_id)
print(json.dumps({"version": info.version, "run_id": run_id}))
"""
)
PROMOTE_CHILD = (
    CHILD_PRELUDE
    + """
uri, model, version = args
print(json.dumps({"version": version, **dataclasses.asdict(promote(model, version, uri))}))
"""
)


def assert_one_version_per_run(client: MlflowClient, model: str, run_ids: list[str]) -> None:
    """N distinct versions, each pointing at its own run, and no run registered twice."""
    stored = client.search_model_versions(f"name = '{model}'")
    run_of = {str(v.version): v.run_id for v in stored}
    assert len(run_of) == len(run_ids), run_of
    assert sorted(run_of.values()) == sorted(run_ids), run_of
    for version in stored:  # its own run's LoggedModel, or its own run's runs:/ URI
        outputs = client.get_run(version.run_id).outputs.model_outputs
        where = [client.get_logged_model(o.model_id).artifact_location for o in outputs]
        expected = where or [f"runs:/{version.run_id}/model"]
        assert [version.source] == expected, (version.version, version.source)


def assert_serial_outcome(
    client: MlflowClient, model: str, metric_of: dict[str, float], returned: dict[str, dict]
) -> None:
    """The registry ends as the promotions, run one after another in their order, leave it.

    The order is that of the decision lines in the description; replaying it through the
    gate must give each recorded and returned decision, the champion each decision saw,
    and the final ``champion`` and ``previous``.
    """
    registered = client.get_registered_model(model)
    lines = [DECISION_LINE.match(line) for line in registered.description.splitlines()]
    assert all(lines), registered.description
    order = [(match[1], match[2]) for match in lines]
    assert sorted(version for version, _ in order) == sorted(metric_of), "one line per version"
    champion = previous = None
    for version, decision in order:
        better = champion is None or metric_of[version] > metric_of[champion]
        assert decision == ("promoted" if better else "refused"), (version, order)
        assert returned[version]["promoted"] is better
        assert returned[version]["champion_version"] == champion, (version, order)
        assert client.get_model_version(model, version).tags[DECISION_TAG] == decision
        if better:
            champion, previous = version, champion
    best = max(metric_of, key=metric_of.get)
    assert champion == best
    expected = {"champion": best, **({"previous": previous} if previous else {})}
    assert {alias: str(v) for alias, v in registered.aliases.items()} == expected


def registered_versions(uri: str, model: str, run_ids: list[str]) -> dict[str, float]:
    """Register the runs one by one; test_f1 of each version."""
    client = MlflowClient(uri, registry_uri=uri)
    metric_of = {}
    for run_id, value in zip(run_ids, METRICS, strict=True):
        metric_of[register_version(client, model, f"runs:/{run_id}/model", run_id).version] = value
    return metric_of


@pytest.mark.server
@pytest.mark.slow
def test_runs_logging_and_registering_at_once_in_threads_get_a_version_each(
    mlflow_server, tmp_path
):
    model = unique("conc-register-threads")
    run_ids = make_runs(mlflow_server, tmp_path, METRICS)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "keyword.txt").write_text("prize")
    example = pd.DataFrame({"text": ["win a prize"]})

    def log_and_register(run_id: str) -> Callable[[], Any]:
        return lambda: log_and_register_model(
            run_id, model_dir, model, mlflow_server, KeywordModel(), example
        )

    infos = all_at_once([log_and_register(run_id) for run_id in run_ids])

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    assert sorted(int(info.version) for info in infos) == list(range(1, N + 1))
    assert_one_version_per_run(client, model, run_ids)


@pytest.mark.server
@pytest.mark.slow
def test_runs_registering_at_once_in_processes_get_a_version_each(mlflow_server, tmp_path):
    model = unique("conc-register-processes")
    run_ids = make_runs(mlflow_server, tmp_path, METRICS)

    results = in_processes(
        REGISTER_CHILD, [[mlflow_server, model, run_id] for run_id in run_ids], tmp_path / "kids"
    )

    assert sorted(int(r["version"]) for r in results) == list(range(1, N + 1))
    assert_one_version_per_run(MlflowClient(mlflow_server), model, run_ids)


@pytest.mark.server
@pytest.mark.slow
def test_promotions_at_once_in_threads_end_as_if_one_after_another(mlflow_server, tmp_path):
    model = unique("conc-promote-threads")
    metric_of = registered_versions(
        mlflow_server, model, make_runs(mlflow_server, tmp_path, METRICS)
    )

    def promote_version(version: str) -> Callable[[], dict]:
        return lambda: asdict(promote(model, version, mlflow_server))

    decisions = all_at_once([promote_version(version) for version in metric_of])

    returned = dict(zip(metric_of, decisions, strict=True))
    assert_serial_outcome(MlflowClient(mlflow_server), model, metric_of, returned)


@pytest.mark.server
@pytest.mark.slow
def test_promotions_at_once_in_processes_end_as_if_one_after_another(mlflow_server, tmp_path):
    model = unique("conc-promote-processes")
    metric_of = registered_versions(
        mlflow_server, model, make_runs(mlflow_server, tmp_path, METRICS)
    )

    results = in_processes(
        PROMOTE_CHILD, [[mlflow_server, model, v] for v in metric_of], tmp_path / "kids"
    )

    returned = {result["version"]: result for result in results}
    assert_serial_outcome(MlflowClient(mlflow_server), model, metric_of, returned)
    lock = MlflowClient(mlflow_server).search_model_versions(f"name = '{lock_model_name(model)}'")
    assert lock == [], "every ticket was given back"


# --- the lock and the retries, on a throwaway SQLite store ----------------------------

MODEL = "locked-model"


def test_a_held_lock_blocks_a_second_holder_and_the_timeout_names_the_fix(tracking_uri):
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    first = RegistryLock(client, MODEL, "promote v1")
    first.acquire()
    started = time.monotonic()
    with pytest.raises(LockTimeout) as timeout:
        RegistryLock(client, MODEL, "promote v2", timeout_s=1.0).acquire()
    assert 1.0 <= time.monotonic() - started < 10
    message = str(timeout.value)
    assert f"ticket v1 of registered model '{MODEL}.peftflow-lock'" in message
    assert "promote v1" in message and f"pid {os.getpid()}" in message
    assert f".delete_model_version('{MODEL}.peftflow-lock', '1')" in message
    tickets = client.search_model_versions(f"name = '{MODEL}.peftflow-lock'")
    assert [str(t.version) for t in tickets] == ["1"], "the waiter that gave up left no ticket"

    first.release()
    with RegistryLock(client, MODEL, "promote v2", timeout_s=5.0) as second:
        assert second.ticket == 3  # numbers are never reused: v2 was the one that gave up
    lock_model = client.get_registered_model(lock_model_name(MODEL))
    assert lock_model.tags[LOCK_TAG] == "true" and is_lock_model(lock_model.name)
    assert "Not a model" in lock_model.description


def test_a_dead_holders_lock_is_taken_over_after_its_lease(tracking_uri):
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    dead = RegistryLock(client, MODEL, "promote v1", ttl_s=1.0)
    dead.acquire()  # ...and its process dies: the ticket is never refreshed nor deleted
    started = time.monotonic()
    with RegistryLock(client, MODEL, "promote v2", ttl_s=1.0, timeout_s=20) as taker:
        waited = time.monotonic() - started
        live = client.search_model_versions(f"name = '{lock_model_name(MODEL)}'")
        assert [int(t.version) for t in live] == [taker.ticket]
    assert 0.5 <= waited < 15, waited  # the store's clock has millisecond steps
    with pytest.raises(RegistryError, match="past its 1 s lease"):
        dead.check()  # had it lived on, it would have stopped before writing


def test_a_holder_whose_ticket_was_deleted_writes_nothing_more(tracking_uri):
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    holder = RegistryLock(client, MODEL, "promote v1", ttl_s=2.0)
    holder.acquire()
    client.delete_model_version(lock_model_name(MODEL), str(holder.ticket))  # by hand
    time.sleep(1.1)  # past half the lease: check() refreshes, and finds the ticket gone
    with pytest.raises(RegistryError, match="was deleted while it was in use"):
        holder.check()


def test_the_lock_makes_read_modify_write_atomic_across_threads(tracking_uri):
    """Four threads add 1 twice each to a registry tag, reading and writing with a pause."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    client.create_registered_model(MODEL, tags={"counter": "0"})

    def add_one() -> None:
        with RegistryLock(client, MODEL, "count", timeout_s=60) as lock:
            value = int(client.get_registered_model(MODEL).tags["counter"])
            time.sleep(0.05)  # without the lock, other threads read the same value here
            lock.check()
            client.set_registered_model_tag(MODEL, "counter", str(value + 1))

    all_at_once([lambda: (add_one(), add_one()) for _ in range(4)])
    assert client.get_registered_model(MODEL).tags["counter"] == "8"


def test_promote_and_rollback_wait_for_the_lock(tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    metric_of = registered_versions(tracking_uri, MODEL, make_runs(tracking_uri, tmp_path, METRICS))
    first, second = list(metric_of)[:2]  # test_f1 0.60, then 0.70
    promote_if_better(MODEL, first, tracking_uri)
    for call in (
        lambda: promote_if_better(MODEL, second, tracking_uri),
        lambda: rollback(MODEL, tracking_uri),
    ):
        with RegistryLock(client, MODEL, "held by the test"):
            waiting = threading.Thread(target=call)
            waiting.start()
            waiting.join(timeout=1.5)
            assert waiting.is_alive(), "it must wait while the lock is held"
            before = {a: str(v) for a, v in client.get_registered_model(MODEL).aliases.items()}
        waiting.join(timeout=30)
        after = {a: str(v) for a, v in client.get_registered_model(MODEL).aliases.items()}
        assert before != after  # it ran once the lock was released
    assert after == {"champion": first}  # promoted v2, then rolled back to v1


def transient() -> MlflowException:
    return MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)


def test_transient_errors_are_retried_with_bounded_backoff():
    pauses: list[float] = []
    failures = [transient(), transient()]

    def flaky() -> str:
        if failures:
            raise failures.pop()
        return "done"

    assert retry_transient(flaky, "testing", sleep=pauses.append) == "done"
    assert len(pauses) == 2 and 0.5 <= pauses[0] <= 0.75 and 1.0 <= pauses[1] <= 1.5

    calls: list[int] = []

    def bad_request() -> None:
        calls.append(1)
        raise MlflowException("no such field", error_code=BAD_REQUEST)

    with pytest.raises(MlflowException, match="no such field"):
        retry_transient(bad_request, "testing", sleep=pauses.append)
    assert len(calls) == 1, "a wrong call is not retried"

    def down() -> None:
        raise transient()

    with pytest.raises(RegistryError, match=r"kept failing while reading X \(4 attempts"):
        retry_transient(down, "reading X", sleep=lambda s: None)
    assert retry.backoff_s(10) <= retry.MAX_DELAY_S * 1.5


def test_a_registration_written_despite_an_error_is_not_registered_twice(
    tracking_uri, tmp_path, monkeypatch
):
    """The store commits, then reports an error; or the client sends the create twice."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    committed_then_failed, sent_twice = make_runs(tracking_uri, tmp_path, [0.5, 0.6])
    real_create = MlflowClient.create_model_version
    mode = {"run": None}

    def faulty_create(self, *args, **kwargs):
        created = real_create(self, *args, **kwargs)
        if mode["run"] == committed_then_failed:
            mode["run"] = None
            raise transient()
        if mode["run"] == sent_twice:
            mode["run"] = None
            return real_create(self, *args, **kwargs)  # the resent POST: a second version
        return created

    monkeypatch.setattr(MlflowClient, "create_model_version", faulty_create)
    monkeypatch.setattr(retry, "backoff_s", lambda attempt, first=0.0: 0.0)
    for run_id in (committed_then_failed, sent_twice):
        mode["run"] = run_id
        info = register_version(client, MODEL, f"runs:/{run_id}/model", run_id)
        live = client.search_model_versions(f"run_id = '{run_id}'")
        assert [str(v.version) for v in live] == [info.version], run_id
