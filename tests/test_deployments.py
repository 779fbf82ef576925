"""prefect.yaml: its schema and entrypoints, then the real thing on a Prefect server + worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from peftflow.config.loading import load_config
from tests.conftest import build_tiny_model_dir, synthetic_spam_table
from tests.pipeline.test_flow_integration import make_project
from tests.servers import background, free_port, tail, wait_healthy

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "prefect.yaml"
DEPLOYMENTS = {
    "finetune": "flows/finetune.py:finetune",
    "study": "flows/study.py:study",
    "train-variant": "flows/train_variant.py:train_variant",
    "refresh": "flows/refresh.py:refresh",
    "promote": "flows/promote.py:promote",
    "rollback": "flows/promote.py:rollback",
}
# Required parameters a deployment cannot default: they are given at run time.
GIVEN_AT_RUN = {
    "promote": {"version": "1"},
    # The study flow gives these to each variant's flow run.
    "train-variant": {
        "study_path": "configs/studies/seven_questions.yaml",
        "variant": "minilm-full",
        "data_md5": "0" * 32 + ".dir",
        "parent_run_id": "0" * 32,
    },
}
SERVER_STARTUP_TIMEOUT_S = 150
RUN_TIMEOUT_S = 420
INTERVAL_S = 10  # the refresh schedule in the test: nightly in prefect.yaml


def load_prefect_yaml() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


def deployments_by_name() -> dict[str, dict]:
    return {d["name"]: d for d in load_prefect_yaml()["deployments"]}


# --- prefect.yaml, no server -------------------------------------------------------------


def test_prefect_yaml_passes_prefects_own_schema():
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = load_prefect_yaml()
    # `prefect deploy` skips every deployment (with only a warning) when this fails.
    model = PrefectYamlModel.model_validate(raw)
    assert {d.name for d in model.deployments} == set(DEPLOYMENTS)
    assert raw["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PEFTFLOW_ROOT }}"}}
    ], "no git clone: the worker runs the flows from its own checkout"
    assert not raw.get("build") and not raw.get("push")
    for deployment in model.deployments:
        assert deployment.entrypoint == DEPLOYMENTS[deployment.name]
        assert deployment.work_pool.name == "cpu", deployment.name


def test_refresh_is_scheduled_nightly_in_utc():
    refresh = deployments_by_name()["refresh"]
    (schedule,) = refresh["schedules"]
    assert schedule["cron"] == "0 3 * * *"
    assert schedule["timezone"] == "UTC"
    assert schedule.get("active", True) is True
    # It watches a source that grows (a mail folder), so it can retrain.
    (config_path,) = refresh["parameters"]["config_paths"]
    assert load_config(REPO / config_path).data.source == "folder"


def test_gpu_pools_are_documented_with_a_gpu_request():
    pools = load_prefect_yaml()["definitions"]["work_pools"]
    assert pools["cpu"]["name"] == "cpu"
    assert pools["gpu"]["name"] == "gpu"
    docker = pools["gpu_docker"]["job_variables"]["container_create_kwargs"]["device_requests"]
    assert docker == [{"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}]
    assert pools["gpu_k8s"]["job_variables"]["gpu_count"] == 1
    # Both run the CUDA build of infra/Dockerfile, and pull data from the shared remote.
    for pool in ("gpu_docker", "gpu_k8s"):
        variables = pools[pool]["job_variables"]
        assert variables["image"].endswith(":gpu"), pool
        assert variables["env"]["PEFTFLOW_DVC_REMOTE"].startswith("s3://"), pool
    assert "-t peftflow:gpu" in (REPO / "infra" / "Dockerfile").read_text()


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_entrypoint_is_a_flow_taking_the_declared_parameters(name, monkeypatch):
    from prefect.flows import Flow, load_flow_from_entrypoint

    deployment = deployments_by_name()[name]
    monkeypatch.chdir(REPO)  # entrypoints are relative to the repo root, as on a worker
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    assert isinstance(flow, Flow)
    assert flow.name == name
    declared = deployment.get("parameters", {})
    accepted = set(flow.parameters.properties)
    assert set(declared) <= accepted, f"{name}: unknown parameters {set(declared) - accepted}"
    # Types and required parameters, exactly as Prefect checks them when a run starts.
    flow.validate_parameters({**declared, **GIVEN_AT_RUN.get(name, {})})
    missing = set(flow.parameters.required or []) - set(declared)
    assert missing == set(GIVEN_AT_RUN.get(name, {})), f"{name}: no value for {missing}"


def test_default_parameters_name_files_that_exist_and_load():
    deployments = deployments_by_name()
    configs = [deployments["finetune"]["parameters"]["config_path"]]
    configs += deployments["refresh"]["parameters"]["config_paths"]
    for path in configs:
        assert load_config(REPO / path).name
    assert (REPO / deployments["study"]["parameters"]["study_path"]).is_file()


# --- the real thing ------------------------------------------------------------------------


def _prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        # The scheduler is on (the refresh test shortens the nightly schedule to seconds);
        # it looks at new or changed schedules every few seconds.
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _prefect(*args: str, env: dict[str, str], cwd: Path = REPO) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def prefect_api(tmp_path) -> Iterator[tuple[str, Path]]:
    """A real `prefect server start` on 127.0.0.1 with its own PREFECT_HOME; always stopped."""
    home = tmp_path / "prefect-home"
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "prefect-server.log"
    command = [sys.executable, "-m", "prefect", "server", "start"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with background(command, _prefect_env(home), tmp_path, log) as server:
        wait_healthy(f"{api_url}/health", server, log, SERVER_STARTUP_TIMEOUT_S)
        yield api_url, home


def deliver_mail(folder: Path, table, start: int) -> None:
    """Write each row as a raw email into ``folder/<label>/``, renamed into place whole."""
    for number, row in enumerate(table.itertuples(), start=start):
        target = folder / row.label / f"m{number:05d}.eml"
        target.parent.mkdir(parents=True, exist_ok=True)
        body = row.text.split("\n\n", 1)[1]
        partial = target.with_name(target.name + ".part")
        partial.write_text(f"From: someone@example.org\nSubject: {row.subject}\n\n{body}\n")
        partial.replace(target)


class ScheduledRuns:
    """The refresh deployment's flow runs as the scheduler starts them, read with their logs."""

    def __init__(self, client, deployment_id, worker_log: Path):
        self.client, self.deployment_id, self.worker_log = client, deployment_id, worker_log
        self.seen_ids: set = set()

    def next_completed(
        self, after: float, expect: str, timeout: float = RUN_TIMEOUT_S
    ) -> tuple[object, str]:
        """The first run started after ``after`` (epoch s) that completed, with its logs.

        A run that ended otherwise fails the test, except one cancelled by the
        deployment's concurrency limit (a run due while another still runs).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for run in self._finished_since(after):
                if run.state.is_completed():
                    return run, self._logs(run, expect)
                assert run.state.is_cancelled(), (
                    f"scheduled refresh ended {run.state.name}: {run.state.message}\n"
                    f"{self._logs(run, expect)}\nworker log:\n{tail(self.worker_log)}"
                )
            time.sleep(2)
        worker = tail(self.worker_log)
        raise AssertionError(f"no scheduled refresh completed; worker log:\n{worker}")

    def _finished_since(self, after: float) -> list:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.client.schemas.sorting import FlowRunSort

        runs = self.client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[self.deployment_id])),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
        )
        fresh = [
            run
            for run in runs
            if run.id not in self.seen_ids
            and run.state is not None
            and run.state.is_final()
            and run.expected_start_time.timestamp() >= after
        ]
        self.seen_ids.update(run.id for run in fresh)
        return fresh

    def _logs(self, run, expect: str) -> str:
        """The run's logs once ``expect`` is among them (or after 60 s: the caller asserts)."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        deadline = time.monotonic() + 60  # run logs are shipped in batches, after the state
        while True:
            logs = self.client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            text = "\n".join(log.message for log in logs)
            if expect in text or time.monotonic() > deadline:
                return text
            time.sleep(1)


@pytest.mark.server
@pytest.mark.slow
def test_scheduled_refresh_retrains_only_when_new_mail_arrives(prefect_api, tmp_path):
    """The shipped refresh deployment, its schedule shortened to seconds, on a real server
    with the scheduler on and a process worker: the first run trains, the next trains
    nothing, new labelled mail lands in the folder, the next run retrains once and the
    gate decides, with its reason on the new model version.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api_url, home = prefect_api
    env = _prefect_env(home, api_url)
    began = time.time()
    model_dir = build_tiny_model_dir("bert", tmp_path / "tiny-bert")
    root = tmp_path / "project"
    config_path = make_project(root, synthetic_spam_table(8), model_dir, "tiny-refresh")
    inbox = root / "inbox"
    deliver_mail(inbox, synthetic_spam_table(200, seed=0), start=0)
    config = yaml.safe_load(config_path.read_text())
    config["data"] = {"source": "folder", "path": str(inbox), "min_class_fraction": 0.1}
    config["train"]["epochs"] = 1  # what is checked is the orchestration, not the model
    config_path.write_text(yaml.safe_dump(config))

    _prefect("work-pool", "create", "cpu", "--type", "process", env=env)
    # prefect.yaml as shipped; only the refresh deployment (the others are checked above).
    _prefect("deploy", "-n", "refresh", "--no-prompt", env=env)

    worker_env = {**env, "PEFTFLOW_ROOT": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    worker_log = tmp_path / "worker.log"
    worker_cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu"]
    worker_cmd += ["--type", "process"]
    # Started outside the checkout: the pull step must move each run into PEFTFLOW_ROOT.
    with (
        background(worker_cmd, worker_env, tmp_path, worker_log),
        temporary_settings({PREFECT_API_URL: api_url}),
        get_client(sync_client=True) as client,
    ):
        (refresh,) = client.read_deployments()
        assert refresh.name == "refresh"
        assert refresh.entrypoint == DEPLOYMENTS["refresh"] and refresh.work_pool_name == "cpu"
        (nightly,) = refresh.schedules
        assert nightly.schedule.cron == "0 3 * * *" and nightly.schedule.timezone == "UTC"
        # The shipped deployment as it is, but due every few seconds, on this project.
        client.update_deployment_schedule(
            refresh.id,
            nightly.id,
            schedule=IntervalSchedule(interval=timedelta(seconds=INTERVAL_S)),
            parameters={"config_paths": [str(config_path)], "root": str(root)},
        )
        runs = ScheduledRuns(client, refresh.id, worker_log)
        store = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")

        started = time.time()
        first, first_logs = runs.next_completed(started - INTERVAL_S, "variant tiny-refresh: ")
        assert "no earlier refresh of these configs" in first_logs, first_logs
        assert "variant tiny-refresh: trained" in first_logs and ", registered v1, promoted" in (
            first_logs
        )
        first_s = time.time() - started

        second, second_logs = runs.next_completed(first.end_time.timestamp(), "nothing to train")
        assert "nothing to train" in second_logs, second_logs
        unchanged_s = time.time() - started - first_s

        deliver_mail(inbox, synthetic_spam_table(100, seed=1), start=200)
        arrived = time.time()
        third, third_logs = runs.next_completed(arrived, "variant tiny-refresh: ")
        assert "data changed (md5 " in third_logs, third_logs
        assert "variant tiny-refresh: trained" in third_logs and "registered v2" in third_logs
        retrain_s = time.time() - arrived
        client.update_deployment_schedule(refresh.id, nightly.id, active=False)

        experiment = store.get_experiment_by_name("integration").experiment_id
        finetunes = store.search_runs([experiment], "tags.`peftflow.kind` = 'finetune'")
        md5s = {run.data.tags["peftflow.data_md5"] for run in finetunes}
        assert len(finetunes) == 2 and len(md5s) == 2, "one training per data version"
        refreshes = store.search_runs([experiment], "tags.`peftflow.kind` = 'refresh'")
        assert sorted(r.data.tags["peftflow.data_md5"] for r in refreshes) == sorted(md5s)
        assert all(r.info.status == "FINISHED" for r in refreshes)
        # The gate decided on version 2, and its reason is on the version itself.
        version = store.get_model_version("tiny-spam", "2")
        decision = version.tags["peftflow.promotion.decision"]
        assert version.tags["peftflow.promotion.reason"]
        champion = store.get_model_version_by_alias("tiny-spam", "champion").version
        assert str(champion) == ("2" if decision == "promoted" else "1"), version.tags
        assert decision in ("promoted", "refused")
        assert ("promoted: " if decision == "promoted" else "not promoted: ") in third_logs
    print(
        f"scheduled refresh: set-up {started - began:.0f} s, first training {first_s:.0f} s, "
        f"unchanged {unchanged_s:.0f} s, retrain after new mail {retrain_s:.0f} s"
    )
