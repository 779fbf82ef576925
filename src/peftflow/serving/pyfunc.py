"""The MLflow pyfunc flavour of a peftflow model (classifier or generator).

``mlflow.pyfunc.load_model("models:/NAME@champion").predict(df)`` takes a
DataFrame with a ``text`` column and returns what the model's task serves: for a
classifier, labels and probabilities; for a generator, the generated text per row.

It imports only the serving runtime (:mod:`peftflow.task.inference`), which the logged
model carries as its ``code_paths`` (:mod:`.runtime`): it serves where peftflow is not
installed.

Depends on: models, task.inference.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from peftflow.errors import DataError
from peftflow.models.saved import LoadedModel
from peftflow.task import inference

# The file MLflow logs with every peftflow model and runs on load ("models from code").
ENTRY_POINT = Path(__file__).with_name("pyfunc_entry.py")


class PeftflowModel(mlflow.pyfunc.PythonModel):
    """Loads the model folder logged under artifact ``model_dir``."""

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> PeftflowModel:
        """The same wrapper around an already loaded model folder (no MLflow involved)."""
        model = cls()
        model._loaded = loaded
        return model

    def load_context(self, context) -> None:
        self._loaded = inference.load(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if isinstance(model_input, pd.Series):
            model_input = model_input.to_frame("text")
        if "text" not in model_input.columns:
            raise DataError(f"input needs a 'text' column; got columns {list(model_input.columns)}")
        texts = model_input["text"].astype(str).tolist()
        return inference.predict(self._loaded, texts)
