"""The serving runtime a logged model carries: peftflow's inference modules, nothing else.

MLflow copies a model's ``code_paths`` into the model; where peftflow is not installed, the
model's entry point (``pyfunc_entry.py``) puts that copy on ``sys.path``. So a model logged
with this copy of peftflow's inference code serves where peftflow is not installed
(``mlflow models serve --env-manager local`` in a virtualenv made from the model's own
requirements). The copy holds only the modules that serving imports, listed here
(tests/serving/test_runtime.py fails when the list and the imports disagree); the
requirements pin the packages they need (tests/serving/test_served_anywhere.py serves from
them alone).

It is used when a model is logged, never by the model itself.

Depends on: models, tracking, task.inference.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from peftflow.models.saved import ADAPTER, MERGED, merge_model_dir, read_meta
from peftflow.task.inference import BASE_BUILDERS
from peftflow.tracking.registration import exact_pins

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # src/peftflow

# Every peftflow module ``peftflow.serving.pyfunc_entry`` imports, as paths in the package.
RUNTIME_MODULES = (
    "__init__.py",
    "env.py",
    "errors.py",
    "fsutil.py",
    "config/__init__.py",
    "config/experiment.py",
    "config/loading.py",
    "config/methods.py",
    "config/sections.py",
    "data/__init__.py",
    "data/encoding.py",
    "data/prompting.py",
    "models/__init__.py",
    "models/assets.py",
    "models/attention.py",
    "models/dropout.py",
    "models/backbone.py",
    "models/causal_lm.py",
    "models/classifier.py",
    "models/saved.py",
    "models/methods/__init__.py",
    "models/methods/adapters.py",
    "models/methods/peft_based.py",
    "models/methods/registry.py",
    "models/methods/selective.py",
    "serving/__init__.py",
    "serving/pyfunc.py",
    "serving/pyfunc_entry.py",
    "task/__init__.py",
    "task/generation_decoding.py",
    "task/inference.py",
    "training/__init__.py",
    "training/batching.py",
    "training/precision.py",
)

# The distributions those modules import (besides the standard library), pinned exactly
# in the model's requirements so MLflow does not infer them (inference imports the model).
RUNTIME_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "huggingface_hub",
    "safetensors",
    "peft",
    "numpy",
    "pandas",
    "pydantic",
    "pyyaml",
    "cloudpickle",
)


# The folder MLflow copies under the model's ``code/``; it holds the ``peftflow`` copy. Not
# ``peftflow`` itself: MLflow puts ``code/`` on ``sys.path`` whenever it loads the model, and
# the entry point adds this folder only where no peftflow is installed.
RUNTIME_DIR = "peftflow_runtime"


def stage_runtime(target: Path) -> Path:
    """Copy the runtime modules to ``target/peftflow_runtime/peftflow``; return the folder to
    pass as ``code_paths`` (``target/peftflow_runtime``)."""
    folder = Path(target) / RUNTIME_DIR
    for relative in RUNTIME_MODULES:
        destination = folder / "peftflow" / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACKAGE_ROOT / relative, destination)
    return folder


def runtime_requirements() -> list[str]:
    """Exact pins of the runtime packages as installed (``+cpu`` labels dropped)."""
    return exact_pins(RUNTIME_PACKAGES)


def folder_to_log(model_dir: Path, fmt: str, scratch: Path) -> Path:
    """The model folder in format ``fmt``: ``model_dir`` itself (an adapter, as trained) or
    its merged copy written under ``scratch``."""
    meta = read_meta(model_dir)
    if fmt == MERGED and meta.get("format", ADAPTER) != MERGED:
        builder = BASE_BUILDERS[meta["task"]]
        return merge_model_dir(model_dir, Path(scratch) / "merged", builder)
    return Path(model_dir)


def flavor_info(model_dir: Path) -> dict:
    """What the model's ``peftflow`` flavor records: its format, task and method, and its
    base (MLflow's PEFT convention: ``source_model_name`` and ``source_model_revision``, plus
    the package and the weight fingerprint an adapter is checked against when it loads)."""
    meta = read_meta(model_dir)
    base = meta["base"]
    return {
        "model_format": meta.get("format", ADAPTER),
        "task": meta["task"],
        "method": meta["config"]["method"]["name"],
        "source_model_name": base.get("hub_id") or base["name"],
        "source_model_revision": base.get("revision"),
        "source_model_package": base.get("package_version"),
        "source_model_fingerprint": base["fingerprint"],
        "artifact_bytes": folder_bytes(Path(model_dir)),
    }


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
