"""Real servers in tests: start in their own process group, wait until healthy, always stop.

Used by the MLflow server fixture, the Prefect deployment test and the `peftflow ui` test.
Each server runs in a session of its own so that everything it forks (uvicorn workers,
flow-run processes) is found and ended by one signal, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(url: str) -> bool:
    """True when ``url`` answers 200 now (a refused or slow connection is just 'not yet')."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``url`` until 200; fail with the log's tail when the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if process.poll() is not None:
            pytest.fail(f"{url}: exited with {process.returncode}:\n{tail(log)}", pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"{url}: not healthy after {timeout} s:\n{tail(log)}", pytrace=False)
        time.sleep(0.5)


def stop_process_group(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group, give it ``timeout`` seconds, SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


@contextlib.contextmanager
def background(
    command: list[str], env: dict[str, str], cwd: Path, log: Path
) -> Iterator[subprocess.Popen]:
    """``command`` running in its own session, output to ``log``; its group stopped on exit."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        stop_process_group(process)


# --- the stack of `make up` (infra/local-servers.sh) --------------------------------------

LOCAL_SERVERS = Path(__file__).resolve().parents[1] / "infra" / "local-servers.sh"


def stack_state_dir() -> Path:
    """A folder for the stack's data. Not under tmp_path: pytest's folders are private to
    their user, and as root Postgres runs as the system user postgres, which must enter it."""
    state = Path(tempfile.mkdtemp(prefix="peftflow-stack-"))
    state.chmod(0o755)
    return state


def stack_env(tmp_path: Path, state: Path) -> dict[str, str]:
    """The environment of `make up` on free ports, its pids under tmp_path, its data in state."""
    return {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "PEFTFLOW_"))
        },
        "PEFTFLOW_RUN_DIR": str(tmp_path / "run"),
        "PEFTFLOW_STATE_DIR": str(state),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        **{f"{name}_PORT": str(free_port()) for name in ("PG", "S3", "PREFECT", "MLFLOW")},
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }


def client_env(up_output: str) -> dict[str, str]:
    """The `export NAME=value` lines `up` prints for clients."""
    return dict(
        line.removeprefix("export ").split("=", 1)
        for line in up_output.splitlines()
        if line.startswith("export ")
    )


def run_stack(action: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LOCAL_SERVERS), action], env=env, capture_output=True, text=True, timeout=300
    )


@contextlib.contextmanager
def local_stack(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`make up` on free ports for one test: the client's environment; always `down` after."""
    state = stack_state_dir()
    env = stack_env(tmp_path, state)
    try:
        up = run_stack("up", env)
        assert up.returncode == 0, up.stdout + up.stderr
        yield client_env(up.stdout)
    finally:
        run_stack("down", env)
        shutil.rmtree(state, ignore_errors=True)
