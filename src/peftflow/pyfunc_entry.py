"""MLflow "models from code" entry point for peftflow classifiers.

MLflow copies this file into the logged model and runs it on load, instead of
unpickling a Python object: no pickle is involved in serving a model.
"""

import mlflow.models

from peftflow.pyfunc import PeftflowModel

mlflow.models.set_model(PeftflowModel())
