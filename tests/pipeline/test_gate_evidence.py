"""The gate's evidence from real registered models: the champion's logged outputs when the
examples are the same, the champion re-scored on the candidate's examples when they differ."""

from __future__ import annotations

import random

import pandas as pd
import pytest
from mlflow import MlflowClient

from peftflow.config import TrackingConfig
from peftflow.evaluation.test_outputs import ARTIFACT_DIR, ExampleOutputs
from peftflow.pipeline.gate import LOGGED, RESCORED, evidence_for
from peftflow.serving.predict import load_predictor
from peftflow.task.registry import save_trained
from tests.serving.test_registered_models import (
    check_split,
    logged_run,
    register_stage,
    tiny_cfg,
    trained_like,
)

WORDS = ["prize", "meeting", "cash", "lunch", "free", "report", "win", "agenda", "offer"]
LABELS = ["ham", "spam"]


def examples(prefix: str, n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(ids, texts, labels) of ``n`` made-up test examples."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(5)) for _ in range(n)]
    return [f"{prefix}{i}" for i in range(n)], texts, [rng.choice(LABELS) for _ in range(n)]


def register_with_outputs(cfg, root, name, ids, texts, refs, predictions=None):
    """Register a tiny LoRA classifier; log its outputs on the examples (its own by default)."""
    model, tokenizer, base = trained_like(cfg)
    model_dir = save_trained(model, tokenizer, cfg, base, root / name)
    run_id = logged_run(cfg, root)
    version = register_stage(cfg, run_id, str(model_dir), root, check_split(root, "text"))
    if predictions is None:
        served = load_predictor(str(model_dir))
        predictions = served(pd.DataFrame({"text": texts}))["label"].tolist()
    outputs = ExampleOutputs("classification", ids, texts, refs, predictions, LABELS, "spam")
    MlflowClient(cfg.tracking.tracking_uri).log_artifact(
        run_id, str(outputs.write(root / f"{name}-outputs")), ARTIFACT_DIR
    )
    return version.version, predictions


@pytest.mark.slow
def test_the_champion_is_rescored_on_the_candidates_examples_only_when_they_differ(
    tiny_models, tracking_uri, tmp_path
):
    cfg = tiny_cfg(tiny_models["llama"], "classification", tracking_uri)
    ids_a, texts_a, refs_a = examples("a", 40, seed=1)
    champion, _ = register_with_outputs(
        cfg, tmp_path, "champion", ids_a, texts_a, refs_a, predictions=list(refs_a)
    )
    settings = TrackingConfig(promote_resamples=200)

    # Same examples: the champion's logged outputs are used (all right, unlike its model).
    same, predicted = register_with_outputs(cfg, tmp_path, "same", ids_a, texts_a, refs_a)
    found = evidence_for("tiny-classification", same, tracking_uri, "test_accuracy", settings)(
        champion
    )
    assert found.champion_scored == LOGGED and found.test_examples == 40
    assert found.interval.champion == 1.0
    mine = sum(p == r for p, r in zip(predicted, refs_a, strict=True)) / 40
    assert found.interval.candidate == pytest.approx(mine)

    # Another data version: the champion model is loaded and scored on the candidate's texts.
    ids_b, texts_b, refs_b = examples("b", 50, seed=2)
    other, _ = register_with_outputs(cfg, tmp_path, "other", ids_b, texts_b, refs_b)
    found = evidence_for("tiny-classification", other, tracking_uri, "test_accuracy", settings)(
        champion
    )
    assert found.champion_scored == RESCORED and found.test_examples == 50
    answers = load_predictor(f"models:/tiny-classification/{champion}", tracking_uri)(
        pd.DataFrame({"text": texts_b})
    )["label"]
    rescored = sum(p == r for p, r in zip(answers, refs_b, strict=True)) / 50
    assert found.interval.champion == pytest.approx(rescored)
    assert found.interval.low <= found.interval.improvement <= found.interval.high


@pytest.mark.slow
def test_a_forty_row_table_trains_and_registers_but_cannot_promote(
    prefect_server, tiny_models, tmp_path
):
    """The case the gate was tightened for: 40 rows leave 8 test examples to judge by."""
    from flows.finetune import finetune
    from tests.conftest import synthetic_spam_table
    from tests.reliability.test_bad_data import write_project

    root = tmp_path / "project"
    config = write_project(root, tiny_models["bert"])
    synthetic_spam_table(40)[["text", "label"]].to_csv(root / "messages.csv", index=False)
    result = finetune(config_path=str(config), root=str(root), run_baseline=False)

    assert result.registered.version == "1" and not result.promotion.promoted
    assert "the test split has 8 examples, fewer than tracking.promote_min_test_examples=30" in (
        result.promotion.reason
    )
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert client.get_registered_model("guarded-spam").aliases == {}
    run = client.get_run(client.get_model_version("guarded-spam", "1").run_id)
    assert run.info.status == "FINISHED" and "test_f1" in run.data.metrics
