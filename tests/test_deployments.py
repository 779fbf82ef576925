"""prefect.yaml: its schema and entrypoints, then the real thing on a Prefect server + worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
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
    assert refresh["parameters"]["config_paths"] == ["configs/experiments/demo.yaml"]


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
        # The nightly cron must not fire a real refresh of the repo's data during the test.
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
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


@pytest.mark.server
@pytest.mark.slow
def test_refresh_deployment_trains_once_then_reports_unchanged_data(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api_url, home = prefect_api
    env = _prefect_env(home, api_url)
    model_dir = build_tiny_model_dir("bert", tmp_path / "tiny-bert")
    root = tmp_path / "project"
    config_path = make_project(root, synthetic_spam_table(240), model_dir, "tiny-refresh")
    config = yaml.safe_load(config_path.read_text())
    config["train"]["epochs"] = 1  # what is checked is the orchestration, not the model
    config_path.write_text(yaml.safe_dump(config))

    _prefect("work-pool", "create", "cpu", "--type", "process", env=env)
    _prefect("deploy", "--all", "--no-prompt", env=env)

    worker_env = {**env, "PEFTFLOW_ROOT": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    worker_log = tmp_path / "worker.log"
    worker_cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu"]
    worker_cmd += ["--type", "process", "--limit", "1"]
    # Started outside the checkout: the pull step must move each run into PEFTFLOW_ROOT.
    with (
        background(worker_cmd, worker_env, tmp_path, worker_log),
        temporary_settings({PREFECT_API_URL: api_url}),
        get_client(sync_client=True) as client,
    ):
        deployments = {d.name: d for d in client.read_deployments()}
        assert set(deployments) == set(DEPLOYMENTS)
        refresh = deployments["refresh"]
        assert refresh.entrypoint == DEPLOYMENTS["refresh"]
        assert refresh.work_pool_name == "cpu"
        (schedule,) = refresh.schedules
        assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "UTC"
        assert refresh.parameters["config_paths"] == ["configs/experiments/demo.yaml"]

        parameters = {"config_paths": [str(config_path)], "root": str(root)}

        def trigger(last_line: str) -> tuple[object, str]:
            """Run the deployment; return the run and its logs once ``last_line`` arrived."""
            run = run_deployment(
                "refresh/refresh", parameters=parameters, timeout=RUN_TIMEOUT_S, poll_interval=2
            )
            state = run.state
            assert state is not None and state.is_completed(), (
                f"refresh ended {state.name if state else None}; worker log:\n{tail(worker_log)}"
            )
            deadline = time.monotonic() + 30  # run logs are shipped in batches, after the state
            while True:
                logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
                text = "\n".join(log.message for log in logs)
                if last_line in text or time.monotonic() > deadline:
                    return run, text
                time.sleep(1)

        started = time.monotonic()
        first, first_logs = trigger("variant tiny-refresh: trained")
        first_s = time.monotonic() - started
        store = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        versions = store.search_model_versions("name='tiny-spam'")
        assert len(versions) == 1, f"the first refresh registers a version:\n{first_logs}"
        assert str(store.get_model_version_by_alias("tiny-spam", "champion").version) == "1"
        experiment = store.get_experiment_by_name("integration").experiment_id
        finetunes = store.search_runs([experiment], "tags.`peftflow.kind` = 'finetune'")
        assert len(finetunes) == 1
        assert "no earlier refresh of these configs" in first_logs
        assert "variant tiny-refresh: trained" in first_logs
        assert ", registered v1, promoted" in first_logs
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[first.id])
            )
        )
        assert len(children) == 1, "one finetune subflow per configured variant"

        started = time.monotonic()
        second, second_logs = trigger("nothing to train")
        second_s = time.monotonic() - started
        md5 = finetunes[0].data.tags["peftflow.data_md5"]
        assert f"data unchanged (md5 {md5}): nothing to train" in second_logs
        assert len(store.search_model_versions("name='tiny-spam'")) == 1
        assert len(store.search_runs([experiment], "tags.`peftflow.kind` = 'finetune'")) == 1
        refreshes = store.search_runs([experiment], "tags.`peftflow.kind` = 'refresh'")
        assert len(refreshes) == 1 and refreshes[0].info.status == "FINISHED"
        assert (
            client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[second.id])
                )
            )
            == []
        ), "unchanged data starts no finetune subflow"
    print(f"refresh via worker: first run {first_s:.0f} s, second run {second_s:.0f} s")
