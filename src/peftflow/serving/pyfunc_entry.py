"""MLflow "models from code" entry point for peftflow models.

MLflow copies this file into the logged model and runs it on load, instead of
unpickling a Python object: no pickle is involved in serving a model.

Depends on: serving.pyfunc.
"""

import mlflow.models

from peftflow.serving.pyfunc import PeftflowModel

mlflow.models.set_model(PeftflowModel())
