"""Data-parallel training as a replaced pipeline stage: ``train.devices: 2`` launches two
gloo processes through accelerate, and the pipeline carries on with the one run they made."""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import partial
from pathlib import Path

import pytest
import yaml

from peftflow.config import parse_config
from peftflow.errors import PeftflowError, TrainingError
from peftflow.pipeline import definition, launch
from peftflow.pipeline.results import RunContext
from tests.conftest import synthetic_spam_table

CPU_ONLY = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def ddp_project(root: Path, model_dir: Path, devices: int = 2):
    """A git project with a CSV of messages and the config of a tiny LoRA on ``devices``."""
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    synthetic_spam_table(240)[["text", "label"]].to_csv(root / "messages.csv", index=False)
    return parse_config(
        {
            "name": "ddp-tiny",
            "seed": 3,
            "data": {
                "source": "table",
                "path": str(root / "messages.csv"),
                "min_class_fraction": 0.1,
                "split": {"max_train_examples": 120},
            },
            # No dropout anywhere (the tiny Llama has none either): each rank would draw its
            # own masks, so only a dropout-free run can equal the one-process run.
            "model": {"name": str(model_dir), "max_length": 48, "head_dropout": 0.0},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "train": {
                "epochs": 2,
                "batch_size": 16,
                "lr": 5e-3,
                "progress": False,
                "devices": devices,
            },
            "tracking": {
                "experiment": "ddp",
                "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
                "register_model": False,
            },
        }
    )


def test_devices_replace_the_training_stage_and_keep_the_run_key(tiny_models, tmp_path):
    cfg = ddp_project(tmp_path / "p", tiny_models["llama"])
    pipeline = definition.finetune_pipeline(cfg)
    assert "train-data-parallel" in pipeline.names and "train-and-evaluate" not in pipeline.names
    one = cfg.model_copy(update={"train": cfg.train.model_copy(update={"devices": 1})})
    assert "train-and-evaluate" in definition.finetune_pipeline(one).names
    assert one.config_hash() == cfg.config_hash()  # how it runs, not what it computes


def test_the_launched_module_refuses_to_run_outside_a_launcher(monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    spec = {
        "config": {"name": "x"},
        "root": str(tmp_path),
        "parent_run_id": None,
        "extra_tags": {},
        "data_md5": "m",
        "split": {"paths": {}, "summary": {}},
        "checks": {},
        "baseline": None,
    }
    (tmp_path / launch.SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(PeftflowError, match="runs under a launcher.*train.devices"):
        launch.main(tmp_path)


@pytest.mark.slow
def test_a_flow_run_with_two_devices_trains_one_run_as_one_process_would(
    prefect_server, tiny_models, tmp_path, monkeypatch, capfd
):
    """The finetune flow, given ``train.devices: 2`` as a deployment run's ``overrides``:
    two gloo processes under DDP train one MLflow run, under the run key of the
    one-process config, with the metrics one process gets (up to float summation order)."""
    from mlflow import MlflowClient

    from flows.finetune import finetune

    for key, value in CPU_ONLY.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def flow(root: Path, **overrides):
        cfg = ddp_project(root, tiny_models["llama"], devices=1)
        config_path = root / "experiment.yaml"
        config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        run = partial(finetune, config_path=str(config_path), root=str(root), run_baseline=False)
        return cfg, run, run(overrides=overrides)

    cfg, rerun, parallel = flow(tmp_path / "project", **{"train.devices": 2})

    out = capfd.readouterr().out
    lines = [line for line in out.splitlines() if "weights sha256" in line]
    assert {line.split()[3] for line in lines} == {"0/2", "1/2"}  # both ranks finished
    assert len({line.split()[-1] for line in lines}) == 1  # with the same weights
    client = MlflowClient(cfg.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert [r.info.run_id for r in runs] == [parallel.trained.run_id]  # rank 1 logged nothing
    tags = runs[0].data.tags
    assert runs[0].info.status == "FINISHED" and tags["peftflow.reload_check"] == "passed"
    assert tags["peftflow.ddp.processes"] == "2" and tags["peftflow.ddp.backend"] == "gloo"
    assert tags["peftflow.run_key"] == cfg.run_key(parallel.data_md5)  # devices not in it
    # One process, the same config: the same run key, so the DDP run serves it from cache.
    assert rerun().trained.run_id == parallel.trained.run_id

    # The same data and settings trained by one process in another folder (so another
    # store, and another key: the config names its paths): the same metrics.
    one_cfg, _, single = flow(tmp_path / "one-process")
    assert single.data_md5 == parallel.data_md5
    one = MlflowClient(one_cfg.tracking.tracking_uri).get_run(single.trained.run_id)
    quality = [name for name in one.data.metrics if name.startswith(("val_", "test_"))]
    assert {"test_f1", "test_accuracy", "val_f1"} <= set(quality), sorted(one.data.metrics)
    for name in quality + ["best_epoch"]:
        assert runs[0].data.metrics[name] == pytest.approx(one.data.metrics[name], abs=1e-4), name
    losses = [m.value for m in client.get_metric_history(runs[0].info.run_id, "epoch/train_loss")]
    one_store = MlflowClient(one_cfg.tracking.tracking_uri)
    one_losses = [
        m.value for m in one_store.get_metric_history(one.info.run_id, "epoch/train_loss")
    ]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert losses == pytest.approx(one_losses, rel=1e-4)


@pytest.mark.slow
def test_a_failed_launch_raises_rank_0s_reason(tiny_models, tmp_path, monkeypatch):
    for key, value in CPU_ONLY.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["llama"], broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    root = tmp_path / "project"
    cfg = ddp_project(root, broken)
    pipeline = definition.finetune_pipeline(cfg, baseline=False)
    with pytest.raises(TrainingError, match="launch of 2 processes failed.*SafetensorError"):
        definition.run(pipeline, RunContext(cfg, root))
