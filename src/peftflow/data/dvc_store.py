"""Version the ingested data with DVC: the md5 in ``<target>.dvc`` *is* the data version.

Uses the in-process ``dvc.repo.Repo`` API (one import instead of a ~1 s Python
start-up per CLI call). Every DVC failure is re-raised as a :class:`DataError`
that says what was attempted and how to fix it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from dvc.exceptions import DvcException
from dvc.repo import Repo

from peftflow.errors import DataError

REMOTE_NAME = "storage"
DEFAULT_REMOTE_DIR = ".dvc-storage"


def ensure_dvc_repo(root: Path, remote_url: str | None = None) -> None:
    """Make ``root`` a DVC repo with analytics off and a default remote named "storage".

    ``remote_url`` may be any DVC URL (s3://, gs://, ssh://, a folder, ...). When it
    is None an existing "storage" remote is kept, else ``<root>/.dvc-storage`` is used.
    """
    root = Path(root)
    if not (root / ".dvc").is_dir():
        # Without git, DVC needs --no-scm; with it, DVC also writes .gitignore entries.
        with _dvc_errors(f"initialise a DVC repo in {root}", "check that the folder is writable"):
            Repo.init(str(root), no_scm=not (root / ".git").exists()).close()
    with (
        _open(root) as repo,
        _dvc_errors("update .dvc/config", "check the remote URL"),
        repo.config.edit() as conf,
    ):
        conf["core"]["analytics"] = False
        if remote_url is not None or REMOTE_NAME not in conf["remote"]:
            storage = conf["remote"].setdefault(REMOTE_NAME, {})
            storage["url"] = remote_url or _default_remote(root)
        conf["core"]["remote"] = REMOTE_NAME


def track(root: Path, target: str = "data") -> str:
    """``dvc add`` the target (hash it into the cache) and return its recorded md5."""
    with (
        _open(root) as repo,
        _dvc_errors(f"add {target}", f"check that {Path(root) / target} exists"),
    ):
        repo.add(str(Path(root) / target))
    return data_md5(root, target)


def push(root: Path, target: str = "data") -> int:
    """Upload the target's cached files to the default remote; returns how many were sent."""
    fix = "check the 'storage' remote (dvc remote list) and its credentials"
    with _open(root) as repo, _dvc_errors(f"push {target}", fix):
        return repo.push(targets=[str(Path(root) / target)])


def pull(root: Path, target: str = "data") -> None:
    """Restore the target from the cache, downloading missing files from the remote."""
    fix = "check that it was pushed and that the 'storage' remote is reachable"
    with _open(root) as repo, _dvc_errors(f"pull {target}", fix):
        repo.pull(targets=[str(Path(root) / target)])


def data_md5(root: Path, target: str = "data") -> str:
    """The md5 recorded in ``<target>.dvc`` (a directory's ends in ``.dir``): the data version."""
    dvc_file = Path(root) / f"{target}.dvc"
    if not dvc_file.is_file():
        raise DataError(
            f"{dvc_file} does not exist: no data is tracked yet; run `peftflow ingest` first"
        )
    try:
        return yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as err:
        raise DataError(
            f"{dvc_file} is not a valid DVC file ({err!r}); restore it from git "
            "or run `peftflow ingest` again"
        ) from err


def _default_remote(root: Path) -> str:
    # DVC reads a relative local path as relative to the working directory and
    # stores it relative to .dvc/, so the repo stays movable; an absolute path
    # would be written verbatim and tie the repo to this machine.
    return os.path.relpath(root / DEFAULT_REMOTE_DIR)


@contextmanager
def _open(root: Path) -> Iterator[Repo]:
    with _dvc_errors(f"open {root} as a DVC repo", "run `peftflow ingest` first"):
        repo = Repo(str(root))
    with repo:
        yield repo


@contextmanager
def _dvc_errors(action: str, fix: str) -> Iterator[None]:
    try:
        yield
    except DvcException as err:
        raise DataError(f"DVC could not {action}: {err}; {fix}") from err
