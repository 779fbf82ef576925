"""The MLflow pyfunc flavour of a peftflow model (classifier or generator).

``mlflow.pyfunc.load_model("models:/NAME@champion").predict(df)`` takes a
DataFrame with a ``text`` column and returns, for a classifier, labels and
probabilities; for a generator, the generated text per row.
"""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd

from peftflow.errors import DataError


class PeftflowModel(mlflow.pyfunc.PythonModel):
    """Loads the model folder logged under artifact ``model_dir``."""

    @classmethod
    def from_loaded(cls, loaded) -> PeftflowModel:
        """The same wrapper around an already loaded model folder (no MLflow involved)."""
        model = cls()
        model._loaded = loaded
        return model

    def load_context(self, context) -> None:
        from peftflow.model_io import load_model

        self._loaded = load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from peftflow.predict import generate_for_texts, predict_texts

        if isinstance(model_input, pd.Series):
            model_input = model_input.to_frame("text")
        if "text" not in model_input.columns:
            raise DataError(f"input needs a 'text' column; got columns {list(model_input.columns)}")
        texts = model_input["text"].astype(str).tolist()
        if self._loaded.task == "generation":
            return generate_for_texts(self._loaded, texts)
        return predict_texts(self._loaded, texts)
