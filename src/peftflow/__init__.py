"""peftflow: workflow-orchestrated parameter-efficient fine-tuning.

Everything here is plain Python (torch, transformers, peft, MLflow, DVC, Great
Expectations). Prefect lives only in the top-level ``tasks/`` and ``flows/``
packages, which wrap these functions.
"""

from peftflow.env import set_offline_env

__version__ = "0.1.0"

set_offline_env()


def pyfunc_entry_path() -> str:
    """The models-from-code file MLflow logs for peftflow classifiers."""
    from pathlib import Path

    return str(Path(__file__).with_name("pyfunc_entry.py"))
