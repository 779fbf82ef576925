import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from peftflow.data.dvc_repo import data_md5, version_location
from peftflow.data.dvc_store import ensure_dvc_repo, pull, push, track
from peftflow.errors import DataError

REMOTE_SECTION = "'remote \"storage\"'"  # DVC quotes the section name as git config does


def git_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    return path


def dvc_config(root: Path) -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(root / ".dvc" / "config")
    return config


def write_data(root: Path, content: str) -> None:
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "rows.txt").write_text(content)


def test_ensure_dvc_repo_in_git_repo_sets_local_default_remote(tmp_path):
    root = git_repo(tmp_path / "project")
    ensure_dvc_repo(root, None)

    config = dvc_config(root)
    assert config["core"]["analytics"] == "False"
    assert config["core"]["remote"] == "storage"
    # Stored relative to .dvc/ so the repo can move.
    assert config[REMOTE_SECTION]["url"] == "../.dvc-storage"
    assert "no_scm" not in config["core"]


def test_ensure_dvc_repo_without_git_uses_no_scm_and_keeps_a_configured_remote(tmp_path):
    root = tmp_path / "plain"
    root.mkdir()
    ensure_dvc_repo(root, "s3://bucket/peftflow")
    ensure_dvc_repo(root, None)  # must not reset the user's remote to the local default

    config = dvc_config(root)
    assert config["core"]["no_scm"] == "True"
    assert config[REMOTE_SECTION]["url"] == "s3://bucket/peftflow"

    ensure_dvc_repo(root, str(tmp_path / "elsewhere"))  # an explicit URL does replace it
    assert dvc_config(root)[REMOTE_SECTION]["url"] == str(tmp_path / "elsewhere")


def test_track_push_pull_roundtrip(tmp_path):
    root = git_repo(tmp_path / "project")
    ensure_dvc_repo(root, None)
    write_data(root, "version one\n")

    md5 = track(root)

    assert md5.endswith(".dir") and md5 == data_md5(root)
    assert push(root) == 2  # the file and the directory listing
    assert any((root / ".dvc-storage").rglob("*"))
    assert "/data" in (root / ".gitignore").read_text().split()

    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    pull(root)
    assert (root / "data" / "rows.txt").read_text() == "version one\n"

    write_data(root, "version two\n")
    assert track(root) != md5


def test_pull_without_pushed_data_is_a_data_error(tmp_path):
    root = git_repo(tmp_path / "project")
    ensure_dvc_repo(root, None)
    write_data(root, "never pushed\n")
    track(root)
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    with pytest.raises(DataError, match=r"(?s)DVC could not pull data.*check that it was pushed"):
        pull(root)


def test_data_md5_needs_an_ingest_first(tmp_path):
    with pytest.raises(DataError, match="run `peftflow ingest` first"):
        data_md5(tmp_path)
    (tmp_path / "data.dvc").write_text("outs: []\n")
    with pytest.raises(DataError, match="is not a valid DVC file"):
        data_md5(tmp_path)


def test_operations_outside_a_dvc_repo_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="open .* as a DVC repo.*run `peftflow ingest` first"):
        track(tmp_path)


def test_the_shared_remote_from_the_environment_is_used_without_editing_dvc_config(
    tmp_path, monkeypatch
):
    """PEFTFLOW_DVC_REMOTE (what `make up` exports) replaces "storage" in memory only."""
    shared = tmp_path / "shared-remote"
    laptop = git_repo(tmp_path / "laptop")
    ensure_dvc_repo(laptop, None)
    tracked_config = (laptop / ".dvc" / "config").read_text()
    monkeypatch.setenv("PEFTFLOW_DVC_REMOTE", str(shared))
    write_data(laptop, "a\nb\n")
    md5 = track(laptop)
    assert push(laptop) == 2  # the manifest and the one file
    assert any(shared.rglob(md5.removesuffix(".dir")[2:] + ".dir"))
    assert not (laptop / ".dvc-storage").exists()  # the tracked remote was not used
    assert (laptop / ".dvc" / "config").read_text() == tracked_config

    worker = git_repo(tmp_path / "worker")  # its own cache, same environment
    ensure_dvc_repo(worker, None)
    shutil.copy(laptop / "data.dvc", worker / "data.dvc")
    pull(worker)
    assert (worker / "data" / "rows.txt").read_text() == "a\nb\n"
    monkeypatch.delenv("PEFTFLOW_DVC_REMOTE")
    shutil.rmtree(worker / "data")
    shutil.rmtree(worker / ".dvc" / "cache")
    with pytest.raises(DataError, match="pull data"):
        pull(worker)  # without it, the worker's own (empty) remote has nothing


def test_version_location_names_the_versions_object_in_the_remote(tmp_path, monkeypatch):
    root = git_repo(tmp_path / "repo")
    ensure_dvc_repo(root)
    write_data(root, "a,b\n1,2\n")
    md5 = track(root)
    push(root)
    where = version_location(root, md5)
    # A local remote: a file URI of the pushed object (the .dir manifest of the data folder).
    assert where == f"{(root / '.dvc-storage').as_uri()}/files/md5/{md5[:2]}/{md5[2:]}"
    assert Path(where.removeprefix("file://")).is_file()
    # The team's object store, as $PEFTFLOW_DVC_REMOTE makes it the remote.
    monkeypatch.setenv("PEFTFLOW_DVC_REMOTE", "s3://dvc/peftflow/")
    assert version_location(root, md5) == f"s3://dvc/peftflow/files/md5/{md5[:2]}/{md5[2:]}"
