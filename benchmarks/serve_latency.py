"""Latency of a registered model served by `mlflow models serve`, outside this repository.

Builds a virtualenv from the model's own requirements.txt (no peftflow, no weight packages;
uv, torch from /opt/wheels), starts `mlflow models serve -m models:/NAME@ALIAS
--env-manager local` on 127.0.0.1 from an empty folder, and times POST /invocations: the
first request, then single-text requests and one batch. An adapter-only model whose base
came from a weight package is given that base through a Hugging Face cache under its hub id
(what an online machine has after the first download); the fingerprint check still applies.
Writes benchmarks/results/serve_latency.md.

    make demo   # or any project whose store holds the model
    .venv/bin/python -m benchmarks.serve_latency --store . --model spam-classifier@champion
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import date
from pathlib import Path

import yaml

import peftflow  # noqa: F401  (offline switches)
from benchmarks.artifact_sizes import cpu_name
from peftflow.models.assets import MODEL_ASSETS, resolve_model
from peftflow.serving.predict import download_model

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = "0" * 40  # the cache's commit hash for a base laid out from its package
# The distributions that ship pretrained weights: never in a served environment.
WEIGHT_PACKAGES = tuple(a.package for a in MODEL_ASSETS.values() if a.package)
TEXTS = [
    "Congratulations! You have won a free cruise, reply now to claim your prize",
    "Can we move the project review to Thursday afternoon?",
]


def build_venv(requirements: Path, folder: Path) -> Path:
    """A virtualenv from ``requirements`` alone (no peftflow, no weight package), resolved to
    this environment's versions so uv takes the wheels from its cache."""
    uv = shutil.which("uv") or str(ROOT / ".tools" / "bin" / "uv")
    if not Path(uv).is_file():
        raise RuntimeError("uv not found: run `make setup` (it installs uv under .tools/)")
    pins = {
        d.metadata["Name"].lower(): d.version.split("+")[0]
        for d in importlib.metadata.distributions()
    }
    skip = {"peftflow"} | set(WEIGHT_PACKAGES)
    constraints = folder.parent / "constraints.txt"
    constraints.write_text("\n".join(f"{n}=={v}" for n, v in sorted(pins.items()) if n not in skip))
    env = {**os.environ, "UV_FIND_LINKS": "/opt/wheels", "UV_PYTHON_DOWNLOADS": "never"}
    install = [uv, "pip", "install", "--python", str(folder / "bin" / "python")]
    for command in (
        [uv, "venv", str(folder), "--python", sys.executable],
        [*install, "-r", str(requirements), "-c", str(constraints)],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return folder


def lay_out_hub_cache(cache: Path, hub_id: str, folder: Path, snapshot: str = SNAPSHOT) -> None:
    """Lay ``folder`` out as huggingface_hub caches a download of ``hub_id`` (branch main)."""
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snapshot)


def hub_cache_for(flavor: dict, cache: Path) -> None:
    """Lay a package-shipped base out in a HF cache under its hub id (adapter models only)."""
    if flavor.get("model_format") != "adapter" or not flavor.get("source_model_package"):
        return
    package = flavor["source_model_package"].split("==")[0]
    asset = next(a for a in MODEL_ASSETS.values() if a.package == package)
    folder = Path(resolve_model(asset.alias).location)
    lay_out_hub_cache(cache, flavor["source_model_name"], folder)


def post(port: int, texts: list[str], timeout: float = 300) -> tuple[list, float]:
    """POST ``texts`` to a scoring server on 127.0.0.1: (its predictions, milliseconds)."""
    body = {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        predictions = json.loads(response.read())["predictions"]
    return predictions, (time.perf_counter() - started) * 1000


def serve_and_time(venv: Path, uri: str, model: str, cache: Path, scratch: Path, n: int) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    empty = scratch / "empty"
    empty.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "PYTHON", "VIRTUAL_ENV"))
    }
    env.update(MLFLOW_TRACKING_URI=uri, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"  # mlflow starts the venv's uvicorn
    command = [str(venv / "bin" / "mlflow"), "models", "serve", "-m", f"models:/{model}"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    started = time.perf_counter()
    log = open(scratch / "serve.log", "wb")  # noqa: SIM115 (closed after the server stops)
    server = subprocess.Popen(command, cwd=empty, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.perf_counter() - started > 300:
                    raise SystemExit((scratch / "serve.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        ready = time.perf_counter() - started
        first = post(port, TEXTS[:1])[1]
        single = [post(port, TEXTS[i % 2 : i % 2 + 1])[1] for i in range(n)]
        batch = [post(port, TEXTS * 16)[1] for _ in range(5)]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    return {"ready_s": ready, "first_ms": first, "single_ms": single, "batch32_ms": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("."), help="folder with mlflow.db")
    parser.add_argument("--model", default="spam-classifier@champion")
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    uri = f"sqlite:///{(args.store / 'mlflow.db').resolve()}"
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        local = download_model(f"models:/{args.model}", uri, scratch / "model")
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["peftflow"]
        hub_cache_for(flavor, scratch / "hf-cache")
        venv = build_venv(local / "requirements.txt", scratch / "venv")
        timing = serve_and_time(venv, uri, args.model, scratch / "hf-cache", scratch, args.requests)
    single = sorted(timing["single_ms"])
    lines = [
        "# Serve latency: `mlflow models serve` from the model's own requirements",
        "",
        f"Measured {date.today()} on {cpu_name()} (2 cores, no GPU), "
        f"`.venv/bin/python -m benchmarks.serve_latency --store <project> --model {args.model}` "
        f"after `make demo`. Model format {flavor['model_format']}, base "
        f"{flavor['source_model_name']}, method {flavor['method']}. One worker; the server runs "
        "in a virtualenv with neither peftflow nor a weight package; an adapter's base comes from "
        "a Hugging Face cache under its hub id.",
        "",
        "| what | time |",
        "|---|---:|",
        f"| server start until /ping answers | {timing['ready_s']:.1f} s |",
        f"| first request (1 text) | {timing['first_ms']:.0f} ms |",
        f"| one text, median of {len(single)} | {statistics.median(single):.0f} ms |",
        f"| one text, slowest of {len(single)} | {single[-1]:.0f} ms |",
        f"| 32 texts, median of 5 | {statistics.median(timing['batch32_ms']):.0f} ms |",
    ]
    out = ROOT / "benchmarks" / "results" / "serve_latency.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
