"""infra/: compose file, Kubernetes manifests and the GPU job template (parsed, not run: no
Docker or Kubernetes here), and the local servers of `make up` / `make down` (run for real)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.servers import client_env, run_stack, stack_env, stack_state_dir

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
    assert "--backend-store-uri=postgresql+psycopg://" in mlflow  # SQLAlchemy 2.0: name psycopg 3
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


def test_compose_and_make_up_share_buckets_databases_and_the_dvc_remote():
    """The container stack and the native one (make up) are one topology."""
    services = compose()["services"]
    worker = services["worker-cpu"]["environment"]
    local = (INFRA / "local-servers.sh").read_text()
    assert f"PEFTFLOW_DVC_REMOTE={worker['PEFTFLOW_DVC_REMOTE']}" in local
    bucket = worker["PEFTFLOW_DVC_REMOTE"].removeprefix("s3://").split("/")[0]
    assert f"local/{bucket}" in _command(services["minio-bucket"])
    assert f"--configure-bucket {bucket}" in (INFRA / "s3-server.sh").read_text()
    artifacts = next(a for a in services["mlflow"]["command"] if "artifacts-destination" in a)
    assert artifacts.split("=", 1)[1] in local  # s3://mlflow/
    assert "--configure-bucket mlflow" in (INFRA / "s3-server.sh").read_text()
    assert "minio-bucket" in services["worker-cpu"]["depends_on"]
    prefect_db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.replace("postgres:5432", "${PG_URL}") in local
    assert "psql_ -f infra/postgres-init.sql" in local  # the databases compose's image creates


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


def test_gpu_job_template_extends_the_kubernetes_workers_own_and_renders_a_gpu_job():
    """What prefect-kubernetes' worker builds from it: a Job whose pod asks for one GPU."""
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

    ours = gpu_template()
    theirs = KubernetesWorker.get_default_base_job_template()
    assert set(theirs["variables"]["properties"]) <= set(ours["variables"]["properties"])
    assert set(theirs["job_configuration"]) <= set(ours["job_configuration"])
    pools = yaml.safe_load((REPO / "prefect.yaml").read_text())["definitions"]["work_pools"]
    variables = ours["variables"]["properties"]
    values = {name: spec["default"] for name, spec in variables.items() if "default" in spec}
    values |= pools["gpu_k8s"]["job_variables"]  # what the GPU deployments send
    job = KubernetesWorkerJobConfiguration(**apply_values(ours["job_configuration"], values))
    pod = job.job_manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert container["image"].endswith("peftflow:gpu")
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert job.env["PEFTFLOW_DVC_REMOTE"].startswith("s3://")


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
def test_the_stack_keeps_runs_models_and_data_versions_across_down_and_up(tmp_path, monkeypatch):
    """Postgres, the S3 store, MLflow and Prefect: everything written survives down/up."""
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    state = stack_state_dir()
    env = stack_env(tmp_path, state)

    def stack(action: str) -> subprocess.CompletedProcess:
        return run_stack(action, env)

    try:
        up = stack("up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "postgres: databases mlflow and prefect created" in up.stdout
        assert "work pool cpu: created" in up.stdout
        clients = client_env(up.stdout)
        assert clients["PREFECT_API_URL"] == f"http://127.0.0.1:{env['PREFECT_PORT']}/api"
        assert clients["PEFTFLOW_DVC_REMOTE"].startswith("s3://")
        pids = {name: (run_dir / f"{name}.pid").read_text() for name in STACK}
        again = stack("up")  # idempotent: nothing restarted, nothing re-created
        assert again.returncode == 0 and again.stdout.count("already running") == 4
        assert {n: (run_dir / f"{n}.pid").read_text() for n in STACK} == pids

        for name, value in clients.items():
            monkeypatch.setenv(name, value)
        written = write_to_the_stack(tmp_path, state, MlflowClient(clients["MLFLOW_TRACKING_URI"]))

        assert stack("down").returncode == 0
        assert not list(run_dir.glob("*.pid"))
        for pid in pids.values():
            assert not Path(f"/proc/{pid.strip()}").exists(), f"server pid {pid} still running"
        assert stack("status").returncode == 3

        up = stack("up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "databases mlflow and prefect exist" in up.stdout
        assert "work pool cpu: exists" in up.stdout  # Prefect's state is in Postgres
        read_back_from_the_stack(tmp_path, MlflowClient(clients["MLFLOW_TRACKING_URI"]), written)
    finally:
        down = stack("down")
        shutil.rmtree(state, ignore_errors=True)
    assert down.returncode == 0, down.stderr
    assert stack("down").stdout.count("not running") == 4


STACK = ("postgres", "s3", "prefect", "mlflow")


def write_to_the_stack(tmp_path: Path, state: Path, client) -> dict:
    """A run with an artifact, a model version, and a data version pushed to the S3 remote."""
    from peftflow.config.sections import DataConfig
    from peftflow.data.ingest import ingest
    from tests.data.test_ingest import SMS_FILE

    run = client.create_run(client.create_experiment("stack"))
    client.log_metric(run.info.run_id, "test_f1", 0.75)
    (tmp_path / "note.txt").write_text("kept")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    client.create_registered_model("stack-model")
    version = client.create_model_version("stack-model", run.info.artifact_uri, run.info.run_id)
    client.set_registered_model_alias("stack-model", "champion", version.version)
    # A data version ingested in one checkout goes to the object store, not a local folder.
    ingested = ingest(DataConfig(source="sms", path=str(SMS_FILE)), tmp_path / "laptop")
    bucket = state / "s3" / "dvc"
    assert any(bucket.rglob(f"*{ingested.data_md5.removesuffix('.dir')[2:]}*"))
    return {"run_id": run.info.run_id, "data_md5": ingested.data_md5}


def read_back_from_the_stack(tmp_path: Path, client, written: dict) -> None:
    """After down/up: the run, its artifact, the alias, and the data version in a new checkout."""
    from peftflow.data.dvc_integrity import checkout_version
    from peftflow.data.dvc_store import ensure_dvc_repo
    from peftflow.errors import DataError

    run = client.get_run(written["run_id"])
    assert run.data.metrics["test_f1"] == 0.75
    assert Path(client.download_artifacts(run.info.run_id, "note.txt")).read_text() == "kept"
    assert client.get_model_version_by_alias("stack-model", "champion").run_id == run.info.run_id
    # A worker's checkout that never saw the data: its own cache, the shared remote.
    worker = tmp_path / "worker"
    ensure_dvc_repo(worker)
    folder = checkout_version(worker, written["data_md5"], tmp_path / "checked-out")
    original = (tmp_path / "laptop" / "data" / "dataset.parquet").read_bytes()
    assert (folder / "dataset.parquet").read_bytes() == original
    missing = "0" * 32 + ".dir"
    with pytest.raises(
        DataError, match=re.escape(f"{missing[:32]}, it is missing; the remote s3://")
    ):
        checkout_version(worker, missing, tmp_path / "never-pushed")
