"""peftflow: workflow-orchestrated parameter-efficient fine-tuning.

Everything here is plain Python (torch, transformers, peft, MLflow, DVC, Great
Expectations). Prefect lives only in the top-level ``tasks/`` and ``flows/``
packages, which wrap these functions.
"""

from peftflow.env import set_offline_env

__version__ = "0.1.0"

set_offline_env()
