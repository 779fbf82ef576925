"""Version the ingested data with DVC: the md5 in ``<target>.dvc`` *is* the data version.

``track`` (``dvc add``), ``push`` and ``pull``, each guarded by the integrity checks of
:mod:`.dvc_integrity`: ``track`` heals the cache after every ``dvc add``, ``push``
refuses to upload a corrupted object and ``pull`` repairs what it brought, so no run
trains on, and no remote receives, bytes that differ from their recorded md5.

Depends on: nothing in peftflow beyond errors.
"""

from __future__ import annotations

from pathlib import Path

from dvc.repo import Repo

from peftflow.data.dvc_integrity import listing, repair, verify
from peftflow.data.dvc_repo import (
    REMOTE_NAME,
    data_md5,
    default_remote,
    dvc_errors,
    open_repo,
)
from peftflow.errors import DataError


def ensure_dvc_repo(root: Path, remote_url: str | None = None) -> None:
    """Make ``root`` a DVC repo with analytics off and a default remote named "storage".

    ``remote_url`` may be any DVC URL (s3://, gs://, ssh://, a folder, ...). When it
    is None an existing "storage" remote is kept, else ``<root>/.dvc-storage`` is used.
    """
    root = Path(root)
    if not (root / ".dvc").is_dir():
        # Without git, DVC needs --no-scm; with it, DVC also writes .gitignore entries.
        with dvc_errors(f"initialise a DVC repo in {root}", "check that the folder is writable"):
            Repo.init(str(root), no_scm=not (root / ".git").exists()).close()
    with (
        open_repo(root) as repo,
        dvc_errors("update .dvc/config", "check the remote URL"),
        repo.config.edit() as conf,
    ):
        conf["core"]["analytics"] = False
        if remote_url is not None or REMOTE_NAME not in conf["remote"]:
            storage = conf["remote"].setdefault(REMOTE_NAME, {})
            storage["url"] = remote_url or default_remote(root)
        conf["core"]["remote"] = REMOTE_NAME


def track(root: Path, target: str = "data") -> str:
    """``dvc add`` the target (hash it into the cache) and return its recorded md5.

    ``dvc add`` keeps an existing cache object of the same md5 without re-hashing
    it, so re-adding unchanged data would keep a rotted object; the target, just
    hashed by DVC, is the good copy, and :func:`repair` heals the cache from it.
    """
    with (
        open_repo(root) as repo,
        dvc_errors(f"add {target}", f"check that {Path(root) / target} exists"),
    ):
        repo.add(str(Path(root) / target))
    repair(root, target)
    return data_md5(root, target)


def push(root: Path, target: str = "data") -> int:
    """Upload the target's cached files to the default remote; returns how many were sent.

    Refuses when a cache object is corrupted: the remote is the copy of last
    resort and must never receive bytes that differ from their md5.
    """
    check = verify(root, target)
    if check.cache:
        raise DataError(
            f"refusing to push {target}: {listing(check.cache)}; run "
            "`peftflow data verify --repair` first (it restores the cache from data/)"
        )
    fix = "check the 'storage' remote (dvc remote list) and its credentials"
    with open_repo(root) as repo, dvc_errors(f"push {target}", fix):
        return repo.push(targets=[str(Path(root) / target)])


def pull(root: Path, target: str = "data") -> None:
    """Restore the target from the cache, downloading missing files from the remote.

    DVC checks out a rotted cache object as it is, so the result is verified
    and repaired (from the remote) before anyone reads it.
    """
    fix = "check that it was pushed and that the 'storage' remote is reachable"
    with open_repo(root) as repo, dvc_errors(f"pull {target}", fix):
        repo.pull(targets=[str(Path(root) / target)])
    repair(root, target)
