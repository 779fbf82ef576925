import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from peftflow.config.sections import DataConfig
from peftflow.data import dvc_store
from peftflow.data.ingest import IngestResult, ingest
from peftflow.data.loaders import load_sms_collection
from peftflow.errors import DataError

SMS_FILE = Path(__file__).parents[1] / "assets" / "data" / "sms.tsv"
SMS_CONFIG = DataConfig(source="sms", path=str(SMS_FILE))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    return project


def snapshot(root: Path) -> dict[str, bytes]:
    """Bytes of everything ingest owns: the data files and the .dvc pointer."""
    paths = [*sorted((root / "data").iterdir()), root / "data.dvc"]
    return {str(path.relative_to(root)): path.read_bytes() for path in paths}


def test_ingest_writes_table_manifest_and_dvc_version(root):
    result = ingest(SMS_CONFIG, root)

    assert result == IngestResult(
        table_path=root / "data" / "dataset.parquet",
        data_md5=dvc_store.data_md5(root),
        n_rows=5,
        label_counts={"ham": 3, "spam": 2},
        source="sms",
    )
    pd.testing.assert_frame_equal(
        pd.read_parquet(result.table_path), load_sms_collection(str(SMS_FILE))
    )
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    assert manifest["source"] == "sms"
    assert manifest["origin"] == "sms.tsv"
    assert manifest["label_counts"] == {"ham": 3, "spam": 2}
    assert manifest["n_rows"] == 5
    assert any((root / ".dvc-storage").rglob("*")), "push=True must fill the remote"
    assert not list(root.glob(".ingest-*")), "staging folder must be cleaned up"


def test_reingest_is_byte_identical_and_keeps_the_md5(root):
    first = ingest(SMS_CONFIG, root)
    before = snapshot(root)

    second = ingest(SMS_CONFIG, root)

    assert second.data_md5 == first.data_md5
    assert snapshot(root) == before


def test_changed_input_gives_a_new_md5(root, tmp_path):
    first = ingest(SMS_CONFIG, root)
    changed = tmp_path / "sms.tsv"
    changed.write_bytes(SMS_FILE.read_bytes() + b"ham\tone more message\n")

    second = ingest(DataConfig(source="sms", path=str(changed)), root)

    assert second.n_rows == 6
    assert second.data_md5 != first.data_md5


def test_pull_restores_the_pushed_version(root):
    result = ingest(SMS_CONFIG, root)
    table_bytes = result.table_path.read_bytes()
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")

    dvc_store.pull(root)

    assert result.table_path.read_bytes() == table_bytes


def test_push_false_leaves_the_remote_empty(root, tmp_path):
    remote = tmp_path / "remote"
    ingest(SMS_CONFIG, root, remote_url=str(remote), push=False)
    assert not remote.exists() or not any(remote.iterdir())


def test_failed_load_leaves_previous_version_untouched(root, tmp_path):
    ingest(SMS_CONFIG, root)
    before = snapshot(root)
    bad = tmp_path / "bad.csv"
    bad.write_text("message,category\nhi,ham\n")

    with pytest.raises(DataError, match="no column"):
        ingest(DataConfig(source="table", path=str(bad)), root)

    assert snapshot(root) == before


def test_failure_after_writing_leaves_previous_version_untouched(root, tmp_path, monkeypatch):
    ingest(SMS_CONFIG, root)
    before = snapshot(root)
    changed = tmp_path / "sms.tsv"
    changed.write_bytes(SMS_FILE.read_bytes() + b"spam\tnew rows that must not land\n")

    def broken_dvc(*_args, **_kwargs):
        raise DataError("DVC could not update .dvc/config: simulated")

    monkeypatch.setattr(dvc_store, "ensure_dvc_repo", broken_dvc)
    with pytest.raises(DataError, match="simulated"):
        ingest(DataConfig(source="sms", path=str(changed)), root)

    assert snapshot(root) == before
    assert not list(root.glob(".ingest-*"))
