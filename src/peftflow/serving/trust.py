"""Loading an MLflow model is a trust decision: a pyfunc runs the code stored with it.

``peftflow predict`` loads a model from a store only when peftflow logged it: its MLmodel
carries the ``peftflow`` flavor, it loads through MLflow's models-from-code loader, and the
code stored with it is byte for byte this peftflow's entry point and serving runtime (so
the only code that runs is code already installed here). Anything else needs
``--trust-model``. A saved model folder runs no stored code (safetensors and JSON), so it
needs no trust.

Depends on: tracking, serving.pyfunc.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.models import Model

from peftflow.errors import DataError
from peftflow.serving.pyfunc import ENTRY_POINT
from peftflow.serving.runtime import PACKAGE_ROOT, RUNTIME_DIR, RUNTIME_MODULES
from peftflow.tracking.registration import PEFTFLOW_FLAVOR

CODE_MODEL_LOADER = "mlflow.pyfunc.loaders.code_model"


def untrusted_reason(folder: Path) -> str | None:
    """Why the MLflow model in ``folder`` is not known to be peftflow's (None: it is)."""
    try:
        mlmodel = Model.load(str(folder))
    except Exception as err:  # noqa: BLE001 - any unreadable MLmodel is simply not ours
        return f"its MLmodel file cannot be read ({err})"
    if PEFTFLOW_FLAVOR not in mlmodel.flavors:
        return f"its MLmodel has no {PEFTFLOW_FLAVOR!r} flavor, so peftflow did not log it"
    pyfunc = mlmodel.flavors.get("python_function", {})
    if pyfunc.get("loader_module") != CODE_MODEL_LOADER:
        return "it loads through other code than peftflow's models-from-code entry point"
    stored = Path(folder) / Path(pyfunc.get("model_code_path", "")).name
    if not stored.is_file() or stored.read_bytes() != ENTRY_POINT.read_bytes():
        return f"the code stored with it ({stored.name}) is not this peftflow's {ENTRY_POINT.name}"
    return _foreign_code(Path(folder) / pyfunc["code"]) if pyfunc.get("code") else None


def _foreign_code(code_dir: Path) -> str | None:
    """Why the code a model carries is not exactly this peftflow's serving runtime, or None."""
    carried = sorted(
        str(path.relative_to(code_dir)) for path in code_dir.rglob("*") if path.is_file()
    )
    expected = sorted(f"{RUNTIME_DIR}/peftflow/{module}" for module in RUNTIME_MODULES)
    if carried != expected:
        odd = sorted(set(carried) ^ set(expected))[:3]
        return f"the code it carries is not peftflow's serving runtime ({', '.join(odd)})"
    for module in RUNTIME_MODULES:
        carried = code_dir / RUNTIME_DIR / "peftflow" / module
        if carried.read_bytes() != (PACKAGE_ROOT / module).read_bytes():
            return f"the code it carries ({RUNTIME_DIR}/peftflow/{module}) is not this peftflow's"
    return None


def require_trusted(folder: Path, uri: str, trust_model: bool) -> None:
    """Refuse to load ``uri`` (downloaded to ``folder``) unless it is peftflow's or trusted."""
    reason = untrusted_reason(folder)
    if reason and not trust_model:
        raise DataError(
            f"--model {uri}: not loaded, because {reason}. Loading an MLflow model runs the "
            "code stored with it; if you trust where this model came from, pass --trust-model"
        )
