"""Security: no unpickling, loopback by default, authentication by environment, no secrets.

Covers docs/reliability.md "Security": weights are safetensors only and no code
path unpickles a file; servers bind 127.0.0.1 unless told otherwise; Prefect
and MLflow authentication switch on from the environment alone; configs cannot
carry credentials into logged params; the repository holds no secrets.
"""

from __future__ import annotations

import ast
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peftflow.config.loading import parse_config
from peftflow.errors import ConfigError
from peftflow.task.registry import build_for_training, save_trained
from peftflow.tracking.runs import standard_tags
from tests.models.test_methods import tiny_config
from tests.servers import background, free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("src", "tasks", "flows")
# Calls that unpickle (run arbitrary code from a file) and must never appear.
UNPICKLING = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("joblib", "load"),
    ("dill", "load"),
    ("dill", "loads"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
}
MODEL_CLASSES = re.compile(r"^AutoModel")


def calls(path: Path):
    """(dotted name, ast.Call) for every call in a Python file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            yield (name, node.func.attr), node


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def python_files():
    for folder in CODE_DIRS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_no_code_path_unpickles_or_trusts_remote_code():
    found = []
    for path in python_files():
        for (owner, attr), call in calls(path):
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            if (owner, attr) in UNPICKLING:
                found.append(f"{where} {owner}.{attr}")
            if (owner, attr) == ("torch", "load"):
                weights_only = keyword(call, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append(f"{where} torch.load without weights_only=True")
            remote = keyword(call, "trust_remote_code")
            if isinstance(remote, ast.Constant) and remote.value is True:
                found.append(f"{where} trust_remote_code=True")
    assert found == []


def test_every_pretrained_model_load_asks_for_safetensors():
    """transformers would unpickle a pytorch_model.bin; every model load forbids it."""
    loads = []
    for path in python_files():
        for (owner, attr), call in calls(path):
            if attr == "from_pretrained" and MODEL_CLASSES.match(owner):
                gguf = keyword(call, "gguf_file") is not None  # GGUF: no pickle either
                safe = keyword(call, "use_safetensors")
                ok = gguf or (isinstance(safe, ast.Constant) and safe.value is True)
                loads.append((f"{path.relative_to(ROOT)}:{call.lineno}", ok))
    assert loads, "the scan found no model loads: it no longer matches the code"
    assert [where for where, ok in loads if not ok] == []


class _Payload:
    """Unpickling this writes a marker file: the proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle ran code"))


def test_a_model_folder_with_pickled_weights_is_refused_unread(tiny_models, tmp_path):
    folder = tmp_path / "pickled-model"
    shutil.copytree(tiny_models["bert"], folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "marker.txt"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    cfg = tiny_config(folder, "lora")
    with pytest.raises(ConfigError) as err:
        build_for_training(cfg)
    assert "holds no .safetensors weights" in str(err.value)
    assert "pickled weights (pytorch_model.bin), which peftflow never loads" in str(err.value)
    assert not marker.exists()


def test_saved_models_are_safetensors_and_json_only(tiny_models, tmp_path):
    cfg = tiny_config(tiny_models["llama"], "lora")
    model, tokenizer, base = build_for_training(cfg)
    folder = save_trained(model, tokenizer, cfg, base, tmp_path / "model")
    suffixes = {path.suffix for path in folder.rglob("*") if path.is_file()}
    assert ".safetensors" in suffixes
    assert suffixes <= {".safetensors", ".json", ".jinja", ".txt", ".model"}, suffixes


@pytest.mark.parametrize(
    ("section", "url", "secret"),
    [
        ("tracking", "http://alice:hunter2@127.0.0.1:5000", "hunter2"),
        ("data", "https://bucket.example/x.zip?X-Amz-Signature=f00dcafe&a=1", "f00dcafe"),
        ("data", "https://host.example/data.zip?token=tok-123", "tok-123"),
    ],
)
def test_configs_refuse_credentials_without_echoing_them(section, url, secret):
    fields = {"tracking_uri": url} if section == "tracking" else {"source": "sms", "url": url}
    with pytest.raises(ConfigError) as err:
        parse_config({"name": "x", section: fields})
    assert "keep credentials out" in str(err.value)
    assert secret not in str(err.value)


def test_logged_params_and_tags_hold_no_environment_secret(monkeypatch, tmp_path):
    secrets = {
        "MLFLOW_TRACKING_PASSWORD": "pw-9f1c-mlflow",
        "PREFECT_API_AUTH_STRING": "admin:pw-3e7a-prefect",
        "AWS_SECRET_ACCESS_KEY": "aws-5d2b-secret",
        "HF_TOKEN": "hf_secret7c4e",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    cfg = parse_config({"name": "x", "tracking": {"tracking_uri": "http://127.0.0.1:5000"}})
    logged = {**cfg.flat_params(), **standard_tags("key", "md5", cfg.config_hash(), tmp_path)}
    text = "\n".join(f"{key}={value}" for key, value in logged.items())
    assert not [name for name, value in secrets.items() if value in text]


# --- servers -------------------------------------------------------------------------------


def test_server_scripts_bind_loopback():
    loopback_flag = {
        "mlflow-server.sh": "--host 127.0.0.1",
        "prefect-server.sh": "--host 127.0.0.1",
        "postgres-server.sh": "-h 127.0.0.1",
        "s3-server.sh": "--address 127.0.0.1",
    }
    for name, flag in loopback_flag.items():
        text = (ROOT / "infra" / name).read_text()
        assert flag in text, name
        assert "0.0.0.0" not in text, name
    servers = sorted(p.name for p in (ROOT / "infra").glob("*-server.sh"))
    assert servers == sorted(loopback_flag)  # a new server script must be listed here


def mlflow_auth_ini(folder: Path, password: str) -> Path:
    ini = folder / "auth.ini"
    ini.write_text(
        textwrap.dedent(
            f"""\
            [mlflow]
            default_permission = READ
            database_uri = sqlite:///{folder / "auth.db"}
            admin_username = admin
            admin_password = {password}
            authorization_function = mlflow.server.auth:authenticate_request_basic_auth
            """
        )
    )
    return ini


def test_mlflow_auth_refuses_to_start_with_the_public_default_password(tmp_path):
    env = {**os.environ, "MLFLOW_AUTH": "basic"}
    env.pop("MLFLOW_AUTH_CONFIG_PATH", None)
    done = subprocess.run(
        ["bash", str(ROOT / "infra" / "mlflow-server.sh"), str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "MLFLOW_AUTH=basic needs MLFLOW_AUTH_CONFIG_PATH" in done.stderr


@pytest.mark.server
@pytest.mark.slow
def test_mlflow_basic_auth_is_switched_on_by_environment(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    from mlflow import MlflowClient

    password = "pw-Long-5e1f"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MLFLOW_AUTH": "basic",
        "MLFLOW_AUTH_CONFIG_PATH": str(mlflow_auth_ini(tmp_path, password)),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
    }
    log = tmp_path / "server.log"
    with background(
        ["bash", str(ROOT / "infra" / "mlflow-server.sh"), str(port)], env, ROOT, log
    ) as server:
        wait_healthy(f"{url}/health", server, log, timeout=120)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
        assert refused.value.code == 401
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client = MlflowClient(url)
        experiment = client.create_experiment("authenticated")
        assert client.get_experiment(experiment).name == "authenticated"


@pytest.mark.server
@pytest.mark.slow
def test_prefect_auth_is_switched_on_by_environment(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_API_AUTH_STRING": "admin:pw-7b2d",
    }
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "prefect.log"
    command = ["bash", str(ROOT / "infra" / "prefect-server.sh"), str(port)]
    with background(command, env, ROOT, log) as server:
        wait_healthy(f"{api}/health", server, log, timeout=120)
        client_env = {**env, "PREFECT_API_URL": api}
        client_env.pop("PREFECT_SERVER_API_AUTH_STRING")
        prefect = [sys.executable, "-m", "prefect", "work-pool", "ls"]
        refused = subprocess.run(prefect, env=client_env, capture_output=True, text=True)
        assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr
        client_env["PREFECT_API_AUTH_STRING"] = "admin:pw-7b2d"
        allowed = subprocess.run(prefect, env=client_env, capture_output=True, text=True)
        assert allowed.returncode == 0, allowed.stdout + allowed.stderr


# --- the repository ------------------------------------------------------------------------

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"AKIA[0-9A-Z]{16}"),
    "private key": re.compile(r"-----BEGIN (?:RSA |EC |OPENSSH |DSA )?PRIVATE KEY-----"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "Prefect Cloud key": re.compile(r"\bpnu_[A-Za-z0-9]{30,}"),
}


def test_the_repository_holds_no_secrets():
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    found = []
    for name in filter(None, tracked):
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        found += [f"{name}: {kind}" for kind, rx in SECRET_PATTERNS.items() if rx.search(text)]
    assert found == []
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".env" in ignored  # local credential files never get committed
