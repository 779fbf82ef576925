"""MLflow-native lineage of a run, as the MLflow UI shows it.

- its data version as dataset inputs: one per split, digest = the DVC md5, source =
  where that version lives in the DVC remote, with the split's row count;
- its code as MLflow's own source tags (git commit, entry point);
- its experiment marked as a model-training experiment, so the UI opens on runs and
  models rather than on GenAI traces.

The ``peftflow.*`` tags stay: the run cache and the registry gate read them.

Depends on: nothing in peftflow beyond gitinfo.
"""

from __future__ import annotations

from collections.abc import Mapping

import mlflow.data
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, SourceType
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)

from peftflow.gitinfo import UNKNOWN_COMMIT

# The experiment tag MLflow's UI reads to pick its view (3.x): runs, models, datasets.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def source_tags(entry_point: str, commit: str) -> dict[str, str]:
    """MLflow's source tags: the entry point that ran, and ``commit`` (from
    ``gitinfo.git_commit``, read once by the caller) when it is known."""
    tags = {
        MLFLOW_SOURCE_NAME: entry_point,
        MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL),
    }
    if commit != UNKNOWN_COMMIT:
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def split_inputs(
    data: str, digest: str, source: str, splits: Mapping[str, pd.DataFrame], split_id: str
) -> list[DatasetInput]:
    """One MLflow dataset input per split: named ``<data>-<split>-<split_id>``, with the data
    version's digest and source, the split's schema and row count, the split as its context.

    One name per split and split: MLflow keeps one dataset per (name, digest) in an
    experiment, and every split of one data version shares its digest.
    """
    inputs = []
    for split, frame in splits.items():
        name = f"{data}-{split}-{split_id}"
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest)
        # _to_mlflow_entity is how mlflow.log_input turns a dataset into what it logs.
        entity = dataset._to_mlflow_entity()
        inputs.append(DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, split)]))
    return inputs


def mark_model_training(client: MlflowClient, experiment_id: str, tags: Mapping[str, str]) -> None:
    """Open ``experiment_id`` on MLflow's model-training view, unless its kind is already set."""
    if EXPERIMENT_KIND_TAG not in tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
