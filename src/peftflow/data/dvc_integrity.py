"""Integrity of DVC data versions: re-hash every copy, repair bad ones from a good one.

Integrity: DVC trusts a cache object (or workspace file) whose inode, mtime and
size it has seen before and never re-hashes it, so bytes that rot in place are
invisible to ``dvc status``, skipped by ``add``/``fetch``/``push`` and copied
into the workspace by ``checkout`` (measured with DVC 3.67.1). :func:`verify`
therefore re-hashes every file of a version itself, and :func:`repair` replaces
a bad copy from a good one: the workspace file, else the remote. ``track`` heals
the cache after every ``dvc add``, ``push`` refuses to upload a corrupted object
and ``pull`` repairs what it brought, so no run trains on, and no remote
receives, bytes that differ from their recorded md5. :func:`verify_remote`
streams the remote's own copies and hashes them; :func:`repair_remote` replaces
bad or missing ones from the verified cache.

Depends on: nothing in peftflow beyond errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from dvc.exceptions import DvcException
from dvc_data.hashfile.hash_info import HashInfo

from peftflow.data.dvc_repo import cache_dir, dvc_errors, dvc_out, open_repo
from peftflow.errors import DataError

MANIFEST = "(directory manifest)"
ASIDE_SUFFIX = ".peftflow-aside"
CACHE_MODE, WORKSPACE_MODE = 0o444, 0o644  # DVC keeps cache objects read-only


class Entry(NamedTuple):
    """One file of a data version: its path inside the folder ("" for a single file), its md5."""

    relpath: str
    md5: str


@dataclass(frozen=True)
class Mismatch:
    """A copy of a tracked file whose bytes do not hash to the md5 DVC recorded for it."""

    place: str  # "cache", "workspace" or "remote"
    name: str  # the file's path inside the data version, or MANIFEST
    path: Path | str  # a remote copy's URL is a str: Path would fold s3:// into s3:/
    expected: str
    actual: str | None  # None: the copy is missing

    def describe(self) -> str:
        found = "it is missing" if self.actual is None else f"found md5 {self.actual}"
        label = self.name or PurePosixPath(str(self.path)).name
        return f"{label} ({self.place} copy {self.path}): expected md5 {self.expected}, {found}"


@dataclass(frozen=True)
class Verification:
    """The outcome of re-hashing one data version's cache objects (and workspace files)."""

    data_md5: str
    n_files: int
    cache: tuple[Mismatch, ...] = ()
    workspace: tuple[Mismatch, ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.cache or self.workspace)


def file_md5(path: Path) -> str | None:
    """md5 of the file's bytes, which is what DVC 3 records (``hash: md5``); None if missing."""
    try:
        with Path(path).open("rb") as handle:
            return hashlib.file_digest(handle, "md5").hexdigest()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def verify(root: Path, target: str = "data") -> Verification:
    """Re-hash the tracked version of ``target``: its cache objects and its workspace files."""
    return verify_version(root, _tracked_md5(root, target), Path(root) / target)


def _tracked_md5(root: Path, target: str) -> str:
    """The version ``<target>.dvc`` records, refused when DVC 2 wrote it."""
    out = dvc_out(root, target)
    if out.get("hash") != "md5":
        raise DataError(
            f"{Path(root) / target}.dvc was written by DVC 2 (no `hash: md5`), whose cache "
            "layout and text hashing peftflow does not check; re-track it with DVC 3: "
            "`dvc cache migrate --dvc-files`, or `peftflow ingest`"
        )
    return out["md5"]


def verify_version(root: Path, md5: str, workspace: Path | None = None) -> Verification:
    """Re-hash every cache object of version ``md5`` and, given ``workspace``, its files there.

    A directory version is checked through its manifest (itself a cache object named
    ``<md5>.dir``, listing each file's relpath and md5); when the manifest is bad its
    files cannot be listed, so that one problem is reported alone.
    """
    cache = cache_dir(root)
    entries, bad_manifest = _entries(cache, md5)
    if bad_manifest is not None:
        return Verification(md5, 0, cache=(bad_manifest,))
    in_workspace = () if workspace is None else _mismatches("workspace", entries, workspace)
    return Verification(
        md5, len(entries), cache=_mismatches("cache", entries, cache), workspace=in_workspace
    )


def repair(root: Path, target: str = "data") -> list[str]:
    """Make the cache and ``target`` match ``<target>.dvc`` again; returns what was restored.

    Bad cache objects come back from a good workspace copy, else from the remote;
    then workspace files that differ are rewritten from the verified cache, which
    undoes a hand edit of ``data/`` (data changes go through the source and
    ``peftflow ingest``). An object no source can restore raises a DataError and
    every copy that could not be restored is left as it was found.
    """
    check = verify(root, target)
    if check.ok:
        return []
    workspace = Path(root) / target
    restored = repair_cache(root, check.data_md5, workspace)
    restored += _restore_workspace(root, check.data_md5, workspace)
    final = verify_version(root, check.data_md5, workspace)
    if not final.ok:
        raise DataError(
            f"{workspace} still differs from {target}.dvc after the repair: "
            f"{listing(final.cache + final.workspace)}; check the disk (space, permissions)"
        )
    return restored


def repair_cache(root: Path, md5: str, workspace: Path | None = None) -> list[str]:
    """Restore version ``md5``'s bad cache objects; returns what was restored.

    A good copy in ``workspace`` is used first (free, works offline), else the
    remote; an object neither can restore raises a DataError.
    """
    restored = _repair_manifest(root, md5, workspace)
    check = verify_version(root, md5, workspace)
    workspace_bad = {bad.name for bad in check.workspace}
    local = [bad for bad in check.cache if workspace is not None and bad.name not in workspace_bad]
    for bad in local:
        source = _in(workspace, Entry(bad.name, bad.expected))
        _atomic_copy(source, bad.path, CACHE_MODE)
    restored += [f"{bad.name}: cache object restored from {workspace}" for bad in local]
    return restored + _from_remote(root, [bad for bad in check.cache if bad not in local])


REMOTE_FIX = (
    "check the 'storage' remote (`dvc remote list`), that it is reachable and its credentials"
)


@dataclass(frozen=True)
class RemoteVerification:
    """The outcome of re-hashing the default remote's copies of one data version."""

    url: str
    data_md5: str
    n_objects: int  # the manifest (of a folder version) and each distinct file object
    bad: tuple[Mismatch, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.bad


def verify_remote(root: Path, target: str = "data") -> RemoteVerification:
    """Re-hash the default remote's copy of every object of the tracked version.

    Each object is streamed from the remote and hashed here: DVC's own ``status
    --cloud`` only asks whether an object exists, so a copy that rotted or was cut
    short on the remote passes it, and would only fail the day it is pulled.
    """
    md5 = _tracked_md5(root, target)
    with open_repo(root) as repo, dvc_errors("read the default remote", REMOTE_FIX):
        odb = repo.cloud.get_remote_odb(None, "verify")
        return _verify_remote_version(odb, md5, cache_dir(root))


def repair_remote(root: Path, target: str = "data") -> tuple[list[str], RemoteVerification]:
    """Upload fresh copies of the remote's bad or missing objects.

    Returns what was restored and the remote's final verification (each object is
    streamed once more after an upload; never twice when nothing needed one). The
    local cache is verified (and repaired from ``<target>/``) first: only bytes that
    hash to their md5 are ever sent. A bad remote copy is deleted before the upload,
    since DVC never overwrites an object it finds present.
    """
    check = verify_remote(root, target)
    if check.ok:
        return [], check
    workspace = Path(root) / target
    restored = repair_cache(root, check.data_md5, workspace)
    cache = cache_dir(root)
    with open_repo(root) as repo, dvc_errors(f"upload to {check.url}", REMOTE_FIX):
        odb = repo.cloud.get_remote_odb(None, "push")
        for bad in check.bad:
            _upload(odb, cache, bad)
        final = _verify_remote_version(odb, check.data_md5, cache)
    if not final.ok:
        raise DataError(
            f"the remote {check.url} still differs from {target}.dvc after the upload: "
            f"{listing(final.bad)}; check the remote's free space and permissions"
        )
    uploaded = [f"{bad.name}: remote copy restored from the cache" for bad in check.bad]
    return restored + uploaded, final


def _verify_remote_version(odb, md5: str, cache: Path) -> RemoteVerification:
    """Re-hash version ``md5``'s objects on the remote ``odb``.

    A folder's files are listed by the remote's manifest, or by the local one when
    the remote's is bad (then that is reported with the rest); with neither, the
    manifest is the one problem reported.
    """
    url = odb.fs.unstrip_protocol(odb.path)
    objects = [Entry(MANIFEST, md5)] if md5.endswith(".dir") else []
    bad = _remote_mismatches(odb, objects)
    entries = _remote_entries(odb, md5) if not bad else _entries(cache, md5)[0]
    if md5.endswith(".dir") and not entries and bad:
        return RemoteVerification(url, md5, 1, bad)
    files = list({entry.md5: entry for entry in entries}.values())
    return RemoteVerification(
        url, md5, len(objects) + len(files), bad + _remote_mismatches(odb, files)
    )


def _remote_entries(odb, md5: str) -> list[Entry]:
    """The files of a version, from the remote's (verified) manifest."""
    if not md5.endswith(".dir"):
        return [Entry("", md5)]
    with odb.fs.open(odb.oid_to_path(md5), "rb") as handle:
        listing = json.loads(handle.read())
    return [Entry(item["relpath"], item["md5"]) for item in listing]


def _remote_mismatches(odb, entries: Iterable[Entry]) -> tuple[Mismatch, ...]:
    """Entries whose remote object is missing or does not hash to its md5."""
    found = []
    for entry in entries:
        oid = entry.md5  # a manifest's oid keeps its .dir suffix; its md5 does not
        path = odb.oid_to_path(oid)
        actual = _remote_md5(odb.fs, path)
        if actual != oid.removesuffix(".dir"):
            url = odb.fs.unstrip_protocol(path)
            found.append(Mismatch("remote", entry.relpath, url, oid.removesuffix(".dir"), actual))
    return tuple(found)


def _remote_md5(fs, path: str) -> str | None:
    """md5 of a remote file, streamed in 1 MiB reads; None when it is missing."""
    digest = hashlib.md5()
    try:
        with fs.open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    except OSError as err:  # permissions, network: nothing was learnt about the copy
        raise DataError(
            f"could not read {fs.unstrip_protocol(path)} ({err}); {REMOTE_FIX}"
        ) from err
    return digest.hexdigest()


def _upload(odb, cache: Path, bad: Mismatch) -> None:
    """Replace one remote object by the verified cache copy."""
    from dvc_objects.fs.local import LocalFileSystem

    oid = bad.expected + (".dir" if bad.name == MANIFEST else "")
    if bad.actual is not None:
        odb.fs.rm(odb.oid_to_path(oid))
    odb.add(str(_object(cache, oid)), LocalFileSystem(), oid, check_exists=False)


def checkout_version(root: Path, md5: str, dest: Path) -> Path:
    """Write directory version ``md5`` into the new folder ``dest`` from the verified cache.

    Missing or corrupted objects are fetched from the remote first. No git history
    is needed (the md5 names the manifest, which lists every file's md5), and
    ``<root>/data`` and ``data.dvc`` are not touched.
    """
    dest = Path(dest)
    if not md5.endswith(".dir"):
        raise DataError(f"data version {md5} is a single file; expected a folder's '<md5>.dir'")
    if dest.exists() and any(dest.iterdir()):
        raise DataError(f"{dest} is not empty; pass a new folder to check data {md5} out into")
    repair_cache(root, md5)
    cache = cache_dir(root)
    entries, _ = _entries(cache, md5)
    for entry in entries:
        _atomic_copy(_object(cache, entry.md5), _in(dest, entry), WORKSPACE_MODE)
    copied = _mismatches("checkout", entries, dest)
    if copied:
        raise DataError(f"checking out data {md5} failed: {listing(copied)}; check the disk")
    return dest


def _entries(cache: Path, md5: str) -> tuple[list[Entry], Mismatch | None]:
    """The files of a version (a folder's from its manifest), or the manifest's mismatch."""
    if not md5.endswith(".dir"):
        return [Entry("", md5)], None
    manifest = _object(cache, md5)
    expected, actual = md5.removesuffix(".dir"), file_md5(manifest)
    if actual != expected:
        return [], Mismatch("cache", MANIFEST, manifest, expected, actual)
    listing = json.loads(manifest.read_bytes())
    return [Entry(item["relpath"], item["md5"]) for item in listing], None


def _mismatches(place: str, entries: Iterable[Entry], base: Path) -> tuple[Mismatch, ...]:
    """Entries whose copy under ``base`` (the cache, or a data folder) hashes wrong."""
    found: dict[Path, Mismatch] = {}
    for entry in entries:
        path = _object(base, entry.md5) if place == "cache" else _in(base, entry)
        if path in found:  # several files may share one cache object: report it once
            continue
        actual = file_md5(path)
        if actual != entry.md5:
            found[path] = Mismatch(place, entry.relpath, path, entry.md5, actual)
    return tuple(found.values())


def _object(cache: Path, oid: str) -> Path:
    return cache / oid[:2] / oid[2:]


def _oid(cache_path: Path) -> str:
    return cache_path.parent.name + cache_path.name


def _in(folder: Path, entry: Entry) -> Path:
    return folder / entry.relpath if entry.relpath else folder


def listing(mismatches: Iterable[Mismatch]) -> str:
    return "; ".join(bad.describe() for bad in mismatches)


def _repair_manifest(root: Path, md5: str, workspace: Path | None) -> list[str]:
    """A bad manifest is rebuilt from ``workspace`` when that gives the same md5, else fetched."""
    if not md5.endswith(".dir"):
        return []
    _, bad = _entries(cache_dir(root), md5)
    if bad is None:
        return []
    if workspace is not None and _rebuild_manifest(workspace, bad):
        return [f"{MANIFEST}: cache object rebuilt from the files in {workspace}"]
    return _from_remote(root, [bad])


def _rebuild_manifest(workspace: Path, bad: Mismatch) -> bool:
    """Write DVC's manifest of ``workspace`` (its sorted JSON) if it hashes to the expected md5."""
    if not workspace.is_dir():
        return False
    files = sorted((p.relative_to(workspace).as_posix(), p) for p in workspace.rglob("*"))
    listing = [{"md5": file_md5(path), "relpath": rel} for rel, path in files if path.is_file()]
    raw = json.dumps(listing, sort_keys=True).encode("utf-8")
    if hashlib.md5(raw).hexdigest() != bad.expected:
        return False  # the workspace holds another version (or extra files): not a source
    _atomic_write(bad.path, lambda tmp: tmp.write_bytes(raw), CACHE_MODE)
    return True


def _from_remote(root: Path, bad: list[Mismatch]) -> list[str]:
    """Fetch fresh copies of bad cache objects; each stays as found when no good copy comes."""
    if not bad:
        return []
    aside = _set_aside(bad)  # DVC skips objects that exist, so the bad ones must go first
    try:
        remote = _fetch(root, [_oid(item.path) for item in bad])
    finally:
        failures = _settle(bad, aside)
    if failures:
        raise DataError(_unrestorable(failures, remote))
    return [f"{item.name or item.path.name}: cache object restored from {remote}" for item in bad]


def _fetch(root: Path, oids: list[str]) -> str:
    """Download objects into the cache from the default remote; returns it, for messages."""
    try:
        with open_repo(root) as repo:
            odb = repo.cloud.get_remote_odb(None, "pull")
            remote = f"the remote {odb.fs.unstrip_protocol(odb.path)}"
            # A fresh Repo per call: DVC caches what it saw in the cache folder.
            repo.cloud.pull([HashInfo("md5", oid) for oid in oids], odb=odb)
            return remote
    except DvcException as err:
        return f"the DVC remote, which could not be read ({err})"


def _set_aside(bad: list[Mismatch]) -> dict[Path, Path]:
    aside = {}
    for item in bad:
        if item.actual is not None:
            spare = item.path.with_name(item.path.name + ASIDE_SUFFIX)
            os.replace(item.path, spare)
            aside[item.path] = spare
    return aside


def _settle(bad: list[Mismatch], aside: dict[Path, Path]) -> list[tuple[Mismatch, str | None]]:
    """Keep fetched copies that hash right; put the old bytes back where none did."""
    failures = []
    for item in bad:
        fetched, spare = file_md5(item.path), aside.get(item.path)
        if fetched == item.expected:
            if spare is not None:
                spare.unlink()
            continue
        failures.append((item, fetched))
        if fetched is not None:
            item.path.unlink()  # the remote's copy is corrupted as well
        if spare is not None:
            os.replace(spare, item.path)
    return failures


def _unrestorable(failures: list[tuple[Mismatch, str | None]], remote: str) -> str:
    lines = [
        f"  - {item.describe()}; {remote} has "
        + ("no copy" if fetched is None else f"a corrupted copy too (md5 {fetched})")
        for item, fetched in failures
    ]
    return (
        "DVC cache objects are corrupted or missing and no good copy was found:\n"
        + "\n".join(lines)
        + "\nThe bad copies were left as they were. Fix: push this data version from a "
        "machine whose cache still has it (`dvc push`), or, if it is the current version, "
        "re-create it from its source with `peftflow ingest` (which rewrites data/ and heals "
        "the cache from it)."
    )


def _restore_workspace(root: Path, md5: str, workspace: Path) -> list[str]:
    """Rewrite the workspace files that differ from the version, from the verified cache."""
    cache = cache_dir(root)
    stale = verify_version(root, md5, workspace).workspace
    for item in stale:
        _atomic_copy(_object(cache, item.expected), item.path, WORKSPACE_MODE)
    return [f"{item.name}: {workspace} copy restored from the cache" for item in stale]


def _atomic_copy(source: Path, dest: Path, mode: int) -> None:
    _atomic_write(dest, lambda tmp: shutil.copyfile(source, tmp), mode)


def _atomic_write(dest: Path, fill: Callable[[Path], object], mode: int) -> None:
    """Write ``dest`` via a temporary sibling: readers see the old or the new file, never half."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(handle)
    try:
        fill(Path(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
