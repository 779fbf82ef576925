"""Build a tiny stand-in for the SpamAssassin npm package (same layout, same md5 naming)."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
from pathlib import Path

# group -> messages (raw bytes); ids are 00001, 00002, ... within each group.
FAKE_MESSAGES: dict[str, list[bytes]] = {
    "easy-ham-1": [
        b"Subject: Lunch on Friday?\n\nAre we still on for lunch?\n",
        b"Subject: Re: build failed\n\nFixed in r1234, please retry.\n",
    ],
    "easy-ham-2": [b"Subject: Minutes\n\nMinutes of the meeting attached below.\n"],
    "hard-ham-1": [
        b"Subject: Your order has shipped\nContent-Type: text/html\n\n"
        b"<p>Your <b>order</b> is on its way &amp; will arrive Monday.</p>\n"
    ],
    "spam-1": [b"Subject: =?utf-8?q?WIN_=E2=82=AC1000?=\n\nClick now to claim your prize!!!\n"],
    "spam-2": [b"Subject: Cheap meds\n\nBest prices, no prescription.\n"],
}
FAKE_COUNTS: dict[str, int] = {group: len(raws) for group, raws in FAKE_MESSAGES.items()}


def write_fake_corpus(data_dir: Path) -> dict[str, Path]:
    """Write ``<group>/<id>.<md5>.txt`` files; returns ``"group/id"`` -> file path."""
    written = {}
    for group, raws in FAKE_MESSAGES.items():
        (data_dir / group).mkdir(parents=True, exist_ok=True)
        for number, raw in enumerate(raws, start=1):
            path = data_dir / group / f"{number:05d}.{hashlib.md5(raw).hexdigest()}.txt"
            path.write_bytes(raw)
            written[f"{group}/{number:05d}"] = path
    return written


def write_fake_tarball(tmp_dir: Path) -> tuple[Path, str]:
    """An npm-style .tgz of the fake corpus (under ``package/data``) and its sha512 integrity."""
    source = tmp_dir / "fake-src"
    write_fake_corpus(source / "package" / "data")
    tarball = tmp_dir / "fake-corpus.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(source / "package", arcname="package")
    return tarball, sri_sha512(tarball.read_bytes())


def write_evil_tarball(path: Path) -> None:
    """A .tgz whose only member escapes the extraction folder (``../escaped.txt``)."""
    payload = b"should never be written"
    member = tarfile.TarInfo("../escaped.txt")
    member.size = len(payload)
    with tarfile.open(path, "w:gz") as archive:
        archive.addfile(member, io.BytesIO(payload))


def sri_sha512(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
