"""The one place where offline / no-telemetry switches are set.

Every entry point (the CLI, the flows, the tests) imports :mod:`peftflow`,
which calls :func:`set_offline_env` once. Values already set by the user win,
so an online user can export ``HF_HUB_OFFLINE=0`` to use hub ids.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

import os

OFFLINE_DEFAULTS: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # A logged model gets exact pip pins; without this MLflow also copies the uv.lock and
    # pyproject.toml of whatever folder the process happens to run in.
    "MLFLOW_LOG_UV_FILES": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}


def set_offline_env() -> None:
    """Apply :data:`OFFLINE_DEFAULTS` without overriding anything already set."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
