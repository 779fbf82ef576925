"""MLflow "models from code" entry point for peftflow models.

MLflow copies this file into the logged model and runs it on load, instead of
unpickling a Python object: no pickle is involved in serving a model.

Where peftflow is installed (training, ``peftflow predict``) the installed package serves.
Elsewhere (``mlflow models serve`` in an environment made from the model's requirements)
the copy of the serving runtime the model carries (``code/peftflow_runtime/peftflow``,
see :mod:`peftflow.serving.runtime`) goes on ``sys.path`` first. Only then: a process that
has peftflow never gets a partial copy on its path, which the processes it spawns would
inherit.

Depends on: serving.pyfunc.
"""

import importlib.util
import sys
from pathlib import Path

import mlflow.models

if importlib.util.find_spec("peftflow") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "code" / "peftflow_runtime"))

from peftflow.serving.pyfunc import PeftflowModel  # noqa: E402  (after the path above)

mlflow.models.set_model(PeftflowModel())
