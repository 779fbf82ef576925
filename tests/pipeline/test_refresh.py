"""The refresh logic without Prefect: md5 decision, state in MLflow, partial failures."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from peftflow.errors import ConfigError
from peftflow.pipeline.refresh import (
    KIND_TAG,
    REFRESH_KIND,
    RefreshError,
    last_refresh,
    plan_refresh,
    refresh_key,
    run_refresh,
)
from peftflow.pipeline.results import Ingested, PipelineState
from peftflow.tracking.promotion import PromotionDecision
from peftflow.tracking.registration import ModelVersionInfo
from peftflow.tracking.runs import RunResult

MD5_A = "a" * 32 + ".dir"
MD5_B = "b" * 32 + ".dir"


def write_config(folder: Path, name: str, tracking_uri: str, **data) -> str:
    config = {
        "name": name,
        "data": {"source": "spamassassin", **data},
        "method": {"name": "lora" if name.endswith("lora") else "full"},
        "tracking": {"experiment": "refresh-test", "tracking_uri": tracking_uri},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture
def plan(tmp_path, tracking_uri):
    paths = [write_config(tmp_path, n, tracking_uri) for n in ("v-full", "v-lora")]
    return plan_refresh(paths, tmp_path)


class FakeFinetune:
    """Stands in for the finetune subflow: records calls, can fail for chosen configs."""

    def __init__(self, md5: str, fail: tuple[str, ...] = ()):
        self.md5, self.fail, self.calls, self.handed_md5s = md5, fail, [], []

    def __call__(self, config_path: str, ingested: Ingested) -> PipelineState:
        self.calls.append(config_path)
        self.handed_md5s.append(ingested.data_md5)
        name = Path(config_path).stem
        if name in self.fail:
            raise RuntimeError(f"{name} ran out of memory")
        version = str(len(self.calls))
        return PipelineState(
            ingested=ingested_version(self.md5),
            trained=RunResult(f"run-{name}", f"key-{name}-{self.md5}", {"test_f1": 0.9}),
            registered=ModelVersionInfo("spam-classifier", version, "runs:/x/model"),
            promotion=PromotionDecision(True, "first champion", 0.9, None, None),
        )


def ingested_version(md5: str) -> Ingested:
    return Ingested(md5, "data/dataset.parquet", 10, {}, "spamassassin")


def refresh_once(plan, root, md5, fail=(), force=False, logger=None):
    finetune = FakeFinetune(md5, fail)
    summary = run_refresh(
        plan, root, lambda: ingested_version(md5), finetune, force=force, logger=logger
    )
    return summary, finetune


def refresh_runs(plan) -> list:
    client = MlflowClient(plan.tracking_uri)
    experiment = client.get_experiment_by_name(plan.experiment)
    return client.search_runs([experiment.experiment_id], f"tags.`{KIND_TAG}` = '{REFRESH_KIND}'")


def test_first_refresh_trains_every_variant_and_records_the_md5(plan, tmp_path):
    summary, finetune = refresh_once(plan, tmp_path, MD5_A)

    assert finetune.calls == list(plan.config_paths)
    assert finetune.handed_md5s == [MD5_A, MD5_A]  # one ingest, handed to every variant
    assert summary["trained"] is True and summary["changed"] is True
    assert summary["state_recorded"] is True
    assert [v["status"] for v in summary["variants"]] == ["trained", "trained"]
    assert [v["registered_version"] for v in summary["variants"]] == ["1", "2"]
    assert summary["variants"][0]["promotion"]["promoted"] is True
    assert last_refresh(plan) == {"run_id": summary["refresh_run_id"], "data_md5": MD5_A}
    run = MlflowClient(plan.tracking_uri).get_run(summary["refresh_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["variants_trained"] == 2


def test_unchanged_md5_trains_nothing_and_says_so(plan, tmp_path, caplog):
    first, _ = refresh_once(plan, tmp_path, MD5_A)
    logger = logging.getLogger("refresh-test")
    with caplog.at_level(logging.INFO, logger="refresh-test"):
        second, finetune = refresh_once(plan, tmp_path, MD5_A, logger=logger)

    assert finetune.calls == []
    assert second["trained"] is False and second["changed"] is False
    assert second["message"] == f"data unchanged (md5 {MD5_A}): nothing to train"
    assert second["message"] in caplog.text
    assert second["refresh_run_id"] == first["refresh_run_id"]
    assert len(refresh_runs(plan)) == 1, "an unchanged refresh records nothing new"


def test_changed_md5_trains_again(plan, tmp_path):
    refresh_once(plan, tmp_path, MD5_A)
    summary, finetune = refresh_once(plan, tmp_path, MD5_B)

    assert len(finetune.calls) == 2
    assert summary["previous_md5"] == MD5_A and summary["data_md5"] == MD5_B
    assert summary["changed"] is True and summary["trained"] is True
    assert last_refresh(plan)["data_md5"] == MD5_B


def test_force_reruns_variants_on_unchanged_data(plan, tmp_path):
    refresh_once(plan, tmp_path, MD5_A)
    summary, finetune = refresh_once(plan, tmp_path, MD5_A, force=True)
    assert len(finetune.calls) == 2
    assert summary["changed"] is False and summary["forced"] is True
    assert summary["trained"] is True


def test_a_failed_variant_keeps_the_old_state_and_the_others_still_run(plan, tmp_path):
    refresh_once(plan, tmp_path, MD5_A)
    with pytest.raises(RefreshError) as err:
        refresh_once(plan, tmp_path, MD5_B, fail=("v-full",))

    summary = err.value.summary
    assert "v-full" in str(err.value)
    assert [v["status"] for v in summary["variants"]] == ["failed", "trained"]
    assert "out of memory" in summary["variants"][0]["error"]
    assert summary["state_recorded"] is False
    failed_run = MlflowClient(plan.tracking_uri).get_run(summary["refresh_run_id"])
    assert failed_run.info.status == "FAILED"
    assert "v-full" in failed_run.data.tags["peftflow.error"]
    assert last_refresh(plan)["data_md5"] == MD5_A, "the new md5 is not recorded"

    # The next scheduled refresh sees the same new md5 as still unprocessed and retries.
    retry, finetune = refresh_once(plan, tmp_path, MD5_B)
    assert len(finetune.calls) == 2 and retry["state_recorded"] is True
    assert last_refresh(plan)["data_md5"] == MD5_B


def test_variant_trained_on_other_data_does_not_advance_the_state(plan, tmp_path):
    finetune = FakeFinetune(MD5_B)  # the source changed between the ingest and the subflow
    summary = run_refresh(plan, tmp_path, lambda: ingested_version(MD5_A), finetune)
    assert summary["state_recorded"] is False
    assert last_refresh(plan) is None


def test_refresh_key_ignores_order_and_state_is_per_config_set(tmp_path, tracking_uri):
    a = write_config(tmp_path, "v-full", tracking_uri)
    b = write_config(tmp_path, "v-lora", tracking_uri)
    forward, backward = plan_refresh([a, b], tmp_path), plan_refresh([b, a], tmp_path)
    assert forward.key == backward.key == refresh_key(forward.configs)
    refresh_once(forward, tmp_path, MD5_A)
    assert last_refresh(plan_refresh([a], tmp_path)) is None, "another config set, own state"


def test_plan_rejects_configs_that_read_other_data(tmp_path, tracking_uri):
    a = write_config(tmp_path, "v-full", tracking_uri)
    b = write_config(tmp_path, "v-lora", tracking_uri, data_dir="other-data")
    with pytest.raises(ConfigError, match="data_dir"):
        plan_refresh([a, b], tmp_path)
    with pytest.raises(ConfigError, match="at least one"):
        plan_refresh([], tmp_path)
    with pytest.raises(ConfigError, match="more than once"):
        plan_refresh([a, a], tmp_path)


def test_split_settings_may_differ_between_variants(tmp_path, tracking_uri):
    a = write_config(tmp_path, "v-full", tracking_uri)
    b = write_config(tmp_path, "v-lora", tracking_uri, split={"test_fraction": 0.3})
    assert len(plan_refresh([a, b], tmp_path).configs) == 2
