"""Bad data never trains, never registers, and never replaces the tracked data.

One project is trained once (data v1 tracked, model v1 champion); then each case
replaces the source file with bad data and runs the finetune flow under a real
Prefect server. Every case must fail with an error naming the problem and the
fix, before training, leaving ``data/``, ``data.dvc``, the MLflow runs and the
registry exactly as they were.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from peftflow.data.split import split_dataset
from peftflow.errors import DataCheckError, DataError, IntegrityError
from tests.conftest import synthetic_spam_table

pytestmark = [pytest.mark.server, pytest.mark.slow]

GOOD = synthetic_spam_table(240)[["text", "label"]]
BAD_BYTE_LINE = GOOD.to_csv(index=False).count("\n") + 1  # texts span several lines


@dataclass(frozen=True)
class BadData:
    """One kind of bad input: how to write it, and what the error must say."""

    name: str
    write: Callable[[Path], None]
    error: type[Exception]
    says: tuple[str, ...]  # fragments naming the problem and the fix
    overrides: tuple[tuple[str, object], ...] = ()


def csv(frame: pd.DataFrame) -> Callable[[Path], None]:
    return lambda path: frame.to_csv(path, index=False)


def with_first(column: str, value: object) -> pd.DataFrame:
    return GOOD.assign(**{column: [value, *GOOD[column].iloc[1:]]})


def truncated_sms_zip(path: Path) -> None:
    lines = "".join(f"{label}\t{text}\n" for text, label in GOOD.itertuples(index=False))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("SMSSpamCollection", lines)
    path.with_suffix(".zip").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def corrupt_corpus_tarball(path: Path) -> None:
    """A cached SpamAssassin tarball whose bytes are not the pinned release."""
    from peftflow.data.spamassassin import TARBALL_NAME

    cache = path.parent / ".cache" / "peftflow"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / TARBALL_NAME).write_bytes(b"\x1f\x8b\x08\x00 a truncated download")


CASES = [
    BadData("empty file", lambda p: p.write_bytes(b""), DataError, ("is empty (0 bytes)",)),
    BadData(
        "header only",
        lambda p: p.write_text("text,label\n"),
        DataCheckError,
        ("expected at least one row", "check the data source"),
    ),
    BadData(
        "wrong columns",
        csv(GOOD.rename(columns={"text": "body"})),
        DataError,
        ("has no column(s) ['text']", "available columns: ['body', 'label']", "data.text_column"),
    ),
    BadData(
        "missing label",
        csv(with_first("label", None)),
        DataError,
        ("1 row(s) have an empty text or label (data row 1)", "fill or drop them"),
    ),
    BadData(
        "unknown label",
        csv(with_first("label", "phishing")),
        DataCheckError,
        ("expected every label to be one of ['ham', 'spam']", "add those labels to data.labels"),
    ),
    BadData(
        "whitespace text",
        csv(with_first("text", " \t ")),
        DataCheckError,
        ("no text to be empty or only whitespace", "row-000001", "drop the listed rows"),
    ),
    BadData(
        "non-UTF-8 bytes",
        lambda p: p.write_bytes(GOOD.to_csv(index=False).encode() + b"caf\xe9 menu,ham\n"),
        DataError,
        (f"is not UTF-8 text (line {BAD_BYTE_LINE}: byte b'\\xe9'", "re-save the file as UTF-8"),
    ),
    BadData(
        "duplicate rows",
        csv(pd.concat([GOOD, GOOD.iloc[:90]])),
        DataCheckError,
        ("repeat an earlier text", "data.max_duplicate_fraction"),
    ),
    BadData(
        "one class only",
        csv(GOOD.assign(label="ham")),
        DataCheckError,
        ("expected each of ['ham', 'spam'] to occur at least once", "add examples"),
    ),
    BadData(
        "extremely long text",
        csv(with_first("text", "word " * 50_000)),
        DataCheckError,
        ("at most 200000 characters", "raise data.max_text_chars"),
    ),
    BadData(
        "truncated archive",
        truncated_sms_zip,
        DataError,
        ("truncated or damaged zip archive", "download it again"),
        (("data.source", "sms"), ("data.path", "{root}/messages.zip")),
    ),
    BadData(
        "checksum mismatch",
        corrupt_corpus_tarball,
        IntegrityError,
        ("does not match its pinned checksum", "delete", "fetch it again"),
        (("data.source", "spamassassin"),),
    ),
]


def write_project(root: Path, model_dir: Path) -> Path:
    root.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    GOOD.to_csv(root / "messages.csv", index=False)
    config = {
        "name": "guarded",
        "seed": 5,
        "data": {"source": "table", "path": str(root / "messages.csv"), "min_class_fraction": 0.1},
        "model": {"name": str(model_dir), "max_length": 32},
        "method": {"name": "lora", "r": 2, "alpha": 4},
        "train": {"epochs": 1, "batch_size": 16, "lr": 5e-3, "progress": False},
        "tracking": {
            "experiment": "guarded",
            "model_name": "guarded-spam",
            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        },
    }
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass(frozen=True)
class Snapshot:
    """What a failed run must leave as it was: tracked data, DVC pointer, runs, registry."""

    dvc_file: str
    data_files: dict[str, str]
    run_ids: frozenset[str]
    versions: tuple[tuple[str, str], ...]
    champion: str

    @classmethod
    def take(cls, root: Path) -> Snapshot:
        client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        versions = client.search_model_versions("name='guarded-spam'")
        return cls(
            dvc_file=(root / "data.dvc").read_text(),
            data_files={
                str(path.relative_to(root)): hashlib.md5(path.read_bytes()).hexdigest()
                for path in sorted((root / "data").rglob("*"))
                if path.is_file()
            },
            run_ids=frozenset(run.info.run_id for run in client.search_runs(experiments)),
            versions=tuple(sorted((v.version, v.run_id) for v in versions)),
            champion=client.get_model_version_by_alias("guarded-spam", "champion").version,
        )


@pytest.fixture(scope="module")
def trained_project(prefect_server, tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """Data v1 ingested, a model trained on it, registered and champion."""
    from flows.finetune import finetune

    root = tmp_path_factory.mktemp("guarded") / "project"
    config = write_project(root, tiny_models["bert"])
    result = finetune(config_path=str(config), root=str(root), run_baseline=False)
    assert result.promotion.promoted is True
    return root, config


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_data_stops_before_training_and_keeps_the_tracked_data(trained_project, case):
    from flows.finetune import finetune

    root, config = trained_project
    before = Snapshot.take(root)
    source = root / "messages.csv"
    case.write(source)
    overrides = {key: str(value).format(root=root) for key, value in case.overrides}
    try:
        with pytest.raises(case.error) as raised:
            finetune(config_path=str(config), root=str(root), overrides=overrides)
    finally:
        GOOD.to_csv(source, index=False)
        shutil.rmtree(root / ".cache", ignore_errors=True)

    message = str(raised.value)
    for fragment in case.says:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert Snapshot.take(root) == before  # data, data.dvc, runs, versions, champion


def test_a_rejected_table_keeps_its_report_beside_the_tracked_data(trained_project):
    """The failed raw-data report is kept (rejected/), the tracked data's report is not touched."""
    from flows.finetune import finetune

    root, config = trained_project
    source = root / "messages.csv"
    csv(GOOD.assign(label="ham"))(source)
    try:
        with pytest.raises(DataCheckError, match="nothing was ingested; the report is in"):
            finetune(config_path=str(config), root=str(root))
    finally:
        GOOD.to_csv(source, index=False)
    rejected = root / "outputs" / "reports" / "guarded-rejected" / "raw_data.md"
    assert rejected.read_text().startswith("# Data checks: `raw_data` FAILED")
    assert "expect_column_distinct_values_to_contain_set" in rejected.read_text()
    md5 = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]
    accepted = root / "outputs" / "reports" / f"guarded-{md5}" / "raw_data.md"
    assert accepted.read_text().startswith("# Data checks: `raw_data` passed")


def test_the_split_never_leaks_a_text_across_splits():
    """Near-duplicates (case, whitespace) and conflicting labels never straddle two splits."""
    from peftflow.checks.split_integrity import validate_splits
    from peftflow.config.sections import SplitConfig

    table = synthetic_spam_table(240)
    echoes = table.iloc[:40].assign(
        id=lambda f: f["id"] + "-echo", text=lambda f: "  " + f["text"].str.upper() + " "
    )
    conflicting = table.iloc[40:50].assign(
        id=lambda f: f["id"] + "-flip",
        label=lambda f: f["label"].map({"ham": "spam", "spam": "ham"}),
    )
    splits = split_dataset(pd.concat([table, echoes, conflicting]), SplitConfig(), seed=1)
    assert validate_splits(splits).success
    kept = pd.concat(splits.values())
    assert not kept["id"].str.endswith("-echo").any()
    assert not kept["id"].isin(table.iloc[40:50]["id"]).any()  # ambiguous texts dropped whole


def test_leaking_splits_stop_the_flow_before_training(trained_project, monkeypatch):
    """If a split ever leaked (a bug, a hand-made split), the leakage suite stops the flow."""
    import peftflow.data.split as splitting
    from flows.finetune import finetune

    root, config = trained_project
    before = Snapshot.take(root)
    honest = splitting.split_dataset

    def leaky(df, cfg, seed):
        splits = honest(df, cfg, seed)
        stolen = splits["train"].iloc[:3].assign(split="test")
        return {**splits, "test": pd.concat([splits["test"], stolen.assign(id=stolen["id"] + "x")])}

    monkeypatch.setattr(splitting, "split_dataset", leaky)
    with pytest.raises(DataCheckError, match="no text .* in more than one split"):
        finetune(config_path=str(config), root=str(root), overrides={"seed": 6})
    after = Snapshot.take(root)
    assert after.run_ids == before.run_ids and after.versions == before.versions
