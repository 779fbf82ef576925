"""infra/: compose file, Kubernetes manifests and the GPU job template (parsed, not run: no
Docker or Kubernetes here), and the local servers of `make up` / `make down` (run for real)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
PLACEHOLDER = re.compile(r"{{\s*([A-Za-z_][A-Za-z0-9_]*)\s*}}")


def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def k8s_objects() -> list[dict]:
    return [doc for doc in yaml.safe_load_all((INFRA / "k8s" / "worker.yaml").read_text()) if doc]


def gpu_template() -> dict:
    return json.loads((INFRA / "k8s" / "gpu-base-job-template.json").read_text())


def _command(service: dict) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


# --- docker compose ----------------------------------------------------------------------


def test_compose_has_the_servers_their_stores_and_a_worker():
    services = compose()["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "worker-cpu"} <= set(services)

    mlflow = _command(services["mlflow"])
    assert "--backend-store-uri=postgresql://" in mlflow
    assert "--artifacts-destination=s3://mlflow/" in mlflow
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "mb --ignore-existing local/mlflow" in _command(services["minio-bucket"])

    prefect = services["prefect-server"]
    assert prefect["image"].startswith("prefecthq/prefect:3.8.8")
    url = prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/prefect" in url

    worker = services["worker-cpu"]
    assert "--pool cpu --type process" in _command(worker)
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["environment"]["PEFTFLOW_ROOT"] == "/app"  # prefect.yaml's pull step


def test_compose_publishes_ports_on_localhost_only():
    published = {name: service.get("ports", []) for name, service in compose()["services"].items()}
    assert published["mlflow"] == ["127.0.0.1:5000:5000"]
    assert published["prefect-server"] == ["127.0.0.1:4200:4200"]
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on all interfaces"


def test_compose_waits_for_healthy_dependencies_and_its_files_exist():
    services = compose()["services"]
    for name in ("mlflow", "prefect-server"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["mlflow"]
    init = (INFRA / "postgres-init.sql").read_text()
    assert "CREATE DATABASE mlflow" in init and "CREATE DATABASE prefect" in init
    for service in services.values():
        build = service.get("build")
        if build:
            assert (INFRA / build["context"] / build["dockerfile"]).is_file(), build
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "ENV PEFTFLOW_ROOT=/app" in dockerfile


def test_gpu_docker_pool_joins_the_compose_network():
    network = compose()["networks"]["peftflow"]["name"]
    pools = yaml.safe_load((REPO / "prefect.yaml").read_text())["definitions"]["work_pools"]
    assert pools["gpu_docker"]["job_variables"]["networks"] == [network]


# --- kubernetes ------------------------------------------------------------------------------


def test_worker_manifest_runs_a_kubernetes_worker_for_the_gpu_pool():
    objects = k8s_objects()
    kinds = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    assert {("Namespace", "peftflow"), ("Deployment", "prefect-worker-gpu")} <= kinds
    assert {("ServiceAccount", "prefect-worker"), ("ServiceAccount", "prefect-flow-runs")} <= kinds
    (deployment,) = [obj for obj in objects if obj["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["containers"]
    args = " ".join(container["args"])
    assert "worker start --pool gpu-k8s --type kubernetes" in args
    template_path = container["args"][container["args"].index("--base-job-template") + 1]
    (mount,) = container["volumeMounts"]
    assert template_path == f"{mount['mountPath']}/gpu-base-job-template.json"
    assert pod["volumes"][0]["configMap"]["name"] == "prefect-gpu-job-template"
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["PREFECT_API_URL"].endswith("/api")
    (role,) = [obj for obj in objects if obj["kind"] == "Role"]
    assert any("jobs" in rule["resources"] and "create" in rule["verbs"] for rule in role["rules"])


def test_gpu_job_template_requests_one_nvidia_gpu_on_a_gpu_node():
    template = gpu_template()
    variables = template["variables"]["properties"]
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert variables["gpu_count"]["default"] == 1
    assert pod["nodeSelector"] == "{{ node_selector }}"
    assert variables["node_selector"]["default"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]


def test_gpu_job_template_is_a_valid_work_pool_template():
    from prefect.server.schemas.actions import WorkPoolCreate

    template = gpu_template()
    # The server-side schema `prefect work-pool create` goes through: it refuses a template
    # whose job configuration names undeclared variables.
    WorkPoolCreate(name="gpu-k8s", type="kubernetes", base_job_template=template)
    used = set(PLACEHOLDER.findall(json.dumps(template["job_configuration"])))
    assert used <= set(template["variables"]["properties"])
    pools = yaml.safe_load((REPO / "prefect.yaml").read_text())["definitions"]["work_pools"]
    assert set(pools["gpu_k8s"]["job_variables"]) <= set(template["variables"]["properties"])


# --- make up / make down ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_makefile_targets_call_the_local_servers_script():
    dry = subprocess.run(
        ["make", "-n", "up", "down", "status", "worker", "deploy", "POOL=gpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stderr
    assert "infra/local-servers.sh up" in dry.stdout
    assert "infra/local-servers.sh down" in dry.stdout
    assert "worker start --pool gpu --type process" in dry.stdout
    assert f"PEFTFLOW_ROOT={REPO}" in dry.stdout
    assert "prefect deploy --all --no-prompt" in dry.stdout
    assert "/.run/" in (REPO / ".gitignore").read_text().splitlines()


@pytest.mark.server
@pytest.mark.slow
def test_local_servers_start_once_stop_cleanly_and_twice_is_harmless(tmp_path):
    run_dir = tmp_path / "run"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))},
        "PEFTFLOW_RUN_DIR": str(run_dir),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_PORT": str(_free_port()),
        "MLFLOW_PORT": str(_free_port()),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }

    def servers(action: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(INFRA / "local-servers.sh"), action],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    try:
        up = servers("up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"export PREFECT_API_URL=http://127.0.0.1:{env['PREFECT_PORT']}/api" in up.stdout
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{env['MLFLOW_PORT']}" in up.stdout
        assert "work pool cpu: created" in up.stdout
        pids = {name: (run_dir / f"{name}.pid").read_text() for name in ("prefect", "mlflow")}

        again = servers("up")
        assert again.returncode == 0 and again.stdout.count("already running") == 2
        assert "work pool cpu: exists" in again.stdout
        assert {n: (run_dir / f"{n}.pid").read_text() for n in pids} == pids

        status = servers("status")
        assert status.returncode == 0 and status.stdout.count("healthy at") == 2
    finally:
        down = servers("down")
    assert down.returncode == 0, down.stderr
    assert not list(run_dir.glob("*.pid"))
    for pid in pids.values():
        assert not Path(f"/proc/{pid.strip()}").exists(), f"server pid {pid} still running"
    assert servers("down").stdout.count("not running") == 2
    assert servers("status").returncode == 3
