"""MLflow-native lineage: source tags, dataset inputs per split, the model-training view."""

from __future__ import annotations

import json
import subprocess

import pandas as pd
from mlflow import MlflowClient

from peftflow.gitinfo import git_commit
from peftflow.tracking.lineage import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING,
    source_tags,
    split_inputs,
)
from peftflow.tracking.runs import RunTracker, ensure_experiment

MD5 = "5a068c8597d0421ba334d75277b07995.dir"


def test_source_tags_name_the_entry_point_and_the_commit_only_when_known(tmp_path):
    assert source_tags("flows/study.py:study", git_commit(tmp_path)) == {
        "mlflow.source.name": "flows/study.py:study",
        "mlflow.source.type": "LOCAL",
    }  # not a git checkout: no commit is claimed
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "first"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    tags = source_tags("peftflow", git_commit(tmp_path))
    assert tags["mlflow.source.git.commit"] == head.strip()


def test_each_split_is_a_dataset_input_with_the_data_versions_digest(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    splits = {
        "train": pd.DataFrame({"text": ["a", "b", "c"], "label": ["ham", "spam", "ham"]}),
        "val": pd.DataFrame({"text": ["d"], "label": ["spam"]}),
        "test": pd.DataFrame({"text": ["e", "f"], "label": ["ham", "spam"]}),
    }
    source = "s3://dvc/peftflow/files/md5/5a/068c8597d0421ba334d75277b07995.dir"
    experiment = ensure_experiment("lineage", uri, tmp_path)
    with RunTracker(uri) as tracker:
        run_id = tracker.start(experiment, "r", {}, {})
        tracker.log_inputs(split_inputs("messages", MD5, source, splits, "3fa2b1c0"))

    inputs = MlflowClient(uri).get_run(run_id).inputs.dataset_inputs
    by_context = {i.tags[0].value: i.dataset for i in inputs}
    assert sorted(by_context) == ["test", "train", "val"]
    for split, dataset in by_context.items():
        assert dataset.name == f"messages-{split}-3fa2b1c0" and dataset.digest == MD5
        assert (dataset.source_type, json.loads(dataset.source)) == ("s3", {"uri": source})
        assert json.loads(dataset.profile)["num_rows"] == len(splits[split])
        columns = [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]]
        assert columns == ["text", "label"]


def test_experiments_open_on_the_model_training_view_unless_a_user_chose(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    made = ensure_experiment("ours", uri, tmp_path)
    assert client.get_experiment(made).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    theirs = client.create_experiment("theirs", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert ensure_experiment("theirs", uri, tmp_path) == theirs
    assert client.get_experiment(theirs).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    older = client.create_experiment("older")  # made before peftflow marked experiments
    ensure_experiment("older", uri, tmp_path)
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
