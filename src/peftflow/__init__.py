"""peftflow: workflow-orchestrated parameter-efficient fine-tuning.

Everything here is plain Python (torch, transformers, peft, MLflow, DVC, Great
Expectations). Prefect lives only in the top-level ``tasks/`` and ``flows/``
packages, which wrap these functions. The packages follow the data's path, each
importing only those before it (tests/test_architecture.py holds them to it):

    config -> data -> checks -> models -> training -> evaluation -> tracking -> task
    -> serving -> reporting -> pipeline -> cli

Depends on: nothing in peftflow beyond env.
"""

from peftflow.env import set_offline_env

__version__ = "0.1.0"

set_offline_env()
