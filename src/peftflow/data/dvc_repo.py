"""The DVC repo underneath: opening it, its cache folder, and the md5 a ``.dvc`` file records.

Uses the in-process ``dvc.repo.Repo`` API (one import instead of a ~1 s Python start-up
per CLI call). Every DVC failure is re-raised as a :class:`DataError` that says what was
attempted and how to fix it.

Depends on: nothing in peftflow beyond errors.
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

# The shared remote of a team's stack (`make up` prints it: s3://dvc/peftflow). When set it
# is every DVC operation's "storage" remote, in memory only: a worker's clone keeps its
# tracked .dvc/config and still pushes to and pulls from the one object store.
REMOTE_ENV = "PEFTFLOW_DVC_REMOTE"


DEFAULT_REMOTE_DIR = ".dvc-storage"


def data_md5(root: Path, target: str = "data") -> str:
    """The md5 recorded in ``<target>.dvc`` (a directory's ends in ``.dir``): the data version."""
    return dvc_out(root, target)["md5"]


def dvc_out(root: Path, target: str) -> dict:
    """The output entry of ``<target>.dvc`` (md5, size, nfiles, hash, path)."""
    dvc_file = Path(root) / f"{target}.dvc"
    if not dvc_file.is_file():
        raise DataError(
            f"{dvc_file} does not exist: no data is tracked yet; run `peftflow ingest` first"
        )
    try:
        out = yaml.safe_load(dvc_file.read_text())["outs"][0]
        if "md5" not in out:
            raise KeyError("md5")
        return out
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as err:
        raise DataError(
            f"{dvc_file} is not a valid DVC file ({err!r}); restore it from git "
            "or run `peftflow ingest` again"
        ) from err


def cache_dir(root: Path) -> Path:
    """Where the repo's DVC 3 objects live (``.dvc/cache/files/md5`` unless cache.dir is set)."""
    with open_repo(root) as repo:
        return Path(repo.cache.local.path)


def default_remote(root: Path) -> str:
    # DVC reads a relative local path as relative to the working directory and
    # stores it relative to .dvc/, so the repo stays movable; an absolute path
    # would be written verbatim and tie the repo to this machine.
    return os.path.relpath(root / DEFAULT_REMOTE_DIR)


def version_location(root: Path, md5: str) -> str:
    """The URL of data version ``md5`` in the "storage" remote (DVC 3's ``files/md5`` layout:
    a directory's ``.dir`` manifest, which lists its files), or "" without a DVC repo or remote."""
    if not (Path(root) / ".dvc").is_dir():
        return ""
    with open_repo(root) as repo:
        url = repo.config["remote"].get(REMOTE_NAME, {}).get("url", "")
    if not url:
        return ""
    if "://" not in url:  # a folder; DVC reads a relative one from .dvc/
        url = (Path(root) / ".dvc" / url).resolve().as_uri()
    return f"{url.rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}"


@contextmanager
def open_repo(root: Path) -> Iterator[Repo]:
    with dvc_errors(f"open {root} as a DVC repo", "run `peftflow ingest` first"):
        repo = Repo(str(root), config=remote_override())
    with repo:
        yield repo


def remote_override() -> dict | None:
    """DVC config that makes ``$PEFTFLOW_DVC_REMOTE`` the "storage" remote, or None."""
    url = os.environ.get(REMOTE_ENV, "").strip()
    if not url:
        return None
    return {"core": {"remote": REMOTE_NAME}, "remote": {REMOTE_NAME: {"url": url}}}


@contextmanager
def dvc_errors(action: str, fix: str) -> Iterator[None]:
    try:
        yield
    except DvcException as err:
        raise DataError(f"DVC could not {action}: {err}; {fix}") from err
