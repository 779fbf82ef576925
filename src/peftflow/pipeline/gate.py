"""The promotion gate's evidence: candidate and champion on the same test examples.

The candidate's per-example test outputs are the ones its run logged
(``evaluation/test_outputs.json``). The champion's are its own logged outputs when they
cover exactly the same examples; otherwise (another data version or split) the champion
model is loaded from the registry and re-scored on the candidate's examples. A paired
bootstrap interval of the metric's difference is what the gate then judges
(:mod:`peftflow.tracking.promotion`).

Depends on: config, evaluation, tracking, serving.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from peftflow.config import TrackingConfig
from peftflow.errors import PeftflowError
from peftflow.evaluation.paired_bootstrap import metric_for, paired_bootstrap
from peftflow.evaluation.test_outputs import ARTIFACT_DIR, ARTIFACT_PATH, ExampleOutputs
from peftflow.serving.predict import load_predictor
from peftflow.tracking.promotion import EvidenceFor, GateEvidence, PromotionDecision, promote
from peftflow.tracking.registration import model_version

logger = logging.getLogger(__name__)

# What a re-scored champion's prediction column is, per task.
PREDICTION_COLUMN = {"classification": "label", "generation": "generated"}

LOGGED = "its logged test outputs"
RESCORED = "re-scored on the candidate's test examples"


def evidence_for(
    model_name: str, version: str, tracking_uri: str, metric: str, settings: TrackingConfig
) -> EvidenceFor:
    """The evidence function the gate calls with the champion version it sees."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    outputs = logged_outputs(client, model_version(client, model_name, version).run_id)

    def evidence(champion_version: str | None) -> GateEvidence | None:
        if outputs is None:
            return None
        if champion_version is None:
            return GateEvidence(len(outputs))
        try:
            champion, how = champion_outputs(client, model_name, champion_version, outputs)
        except PeftflowError as error:  # e.g. its base is not available here
            return GateEvidence(len(outputs), unscored=str(error))
        score = metric_for(outputs.task, metric, outputs.labels, outputs.positive_label)
        interval = paired_bootstrap(
            metric,
            score,
            outputs.references,
            outputs.predictions,
            champion,
            level=settings.promote_confidence,
            resamples=settings.promote_resamples,
        )
        return GateEvidence(len(outputs), interval, how)

    return evidence


def logged_outputs(client: MlflowClient, run_id: str) -> ExampleOutputs | None:
    """The run's per-example test outputs, or None for a run that logged none (older runs)."""
    try:
        listed = [a.path for a in client.list_artifacts(run_id, ARTIFACT_DIR)]
    except (MlflowException, OSError):
        return None
    if ARTIFACT_PATH not in listed:
        return None
    with tempfile.TemporaryDirectory() as scratch:
        return ExampleOutputs.read(Path(client.download_artifacts(run_id, ARTIFACT_PATH, scratch)))


def champion_outputs(
    client: MlflowClient, model_name: str, version: str, candidate: ExampleOutputs
) -> tuple[list[str], str]:
    """The champion's predictions on the candidate's examples, and how they were obtained."""
    logged = logged_outputs(client, model_version(client, model_name, version).run_id)
    if logged is not None and logged.same_examples(candidate):
        return logged.predictions, LOGGED
    logger.info("re-scoring %s v%s on %d test examples", model_name, version, len(candidate))
    predict = load_predictor(f"models:/{model_name}/{version}", client.tracking_uri)
    answered = predict(pd.DataFrame({"text": candidate.inputs}))
    return answered[PREDICTION_COLUMN[candidate.task]].astype(str).tolist(), RESCORED


def promote_with_evidence(
    model_name: str,
    version: str,
    tracking_uri: str,
    metric: str | None,
    margin: float,
    settings: TrackingConfig | None = None,
) -> PromotionDecision:
    """The gate users run (``peftflow promote``, the promotion flow), with evidence."""
    settings = settings or TrackingConfig()
    return promote(
        model_name,
        str(version),
        tracking_uri,
        metric,
        margin,
        evidence_for=lambda chosen: evidence_for(
            model_name, str(version), tracking_uri, chosen, settings
        ),
        min_test_examples=settings.promote_min_test_examples,
    )
