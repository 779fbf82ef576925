"""A folder of labelled raw emails that grows: the source a scheduled refresh watches.

Layout: ``<folder>/<label>/<any name>``, one raw RFC 822 message per file, one subfolder
per name in ``data.labels`` (``inbox/ham/``, ``inbox/spam/``). This is what a mail export
or a reviewer's "spam"/"not spam" folders look like: new labelled mail is dropped in, and
the next ingest gives a new DVC md5, so the nightly refresh retrains.

Files whose name starts with ``.`` or ends with ``.tmp`` / ``.part`` are skipped: they are
copies still being written (:func:`deliver` writes under such a name and renames, and so
should any tool that drops mail in), so an ingest never reads half a message.

:func:`deliver` fills a folder from the SpamAssassin corpus release by release: the
2002-10 parts first, then the 2003-02 parts (``easy_ham_2``, ``spam_2``), as the corpus
itself grew.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from peftflow.data.email_parse import email_text, parse_email
from peftflow.data.schema import make_table
from peftflow.data.spamassassin import GROUP_LABELS, RELEASES, fetch_spamassassin
from peftflow.errors import ConfigError, DataError

# Suffixes of files still being written into the folder (skipped, never half-read).
PARTIAL_SUFFIXES = (".tmp", ".part")


def load_mail_folder(folder: str | Path, labels: Sequence[str]) -> pd.DataFrame:
    """Every complete message under ``folder/<label>/`` as the standard table.

    A message's id is ``<label>/<path below the label folder>``, so it is stable across
    ingests; the table is sorted by id (:func:`make_table`), so the md5 depends only on
    the messages, never on listing order or file times.
    """
    folder = Path(folder)
    _require_layout(folder, labels)
    records = [
        _record(label, path, folder / label)
        for label in labels
        for path in sorted(message_files(folder / label))
    ]
    if not records:
        raise DataError(
            f"mail folder {folder} holds no messages (expected files under "
            f"{', '.join(f'{folder / label}/' for label in labels)}); drop labelled emails "
            "there, or fill it from SpamAssassin with `peftflow data deliver --release 2002`"
        )
    return make_table(records)


def message_files(label_dir: Path) -> list[Path]:
    """Complete message files below ``label_dir`` (subfolders included)."""
    return [
        path
        for path in label_dir.rglob("*")
        if path.is_file() and not _is_partial(path.relative_to(label_dir))
    ]


def _is_partial(relative: Path) -> bool:
    hidden = any(part.startswith(".") for part in relative.parts)
    return hidden or relative.name.endswith(PARTIAL_SUFFIXES)


def _require_layout(folder: Path, labels: Sequence[str]) -> None:
    """One subfolder per label and nothing else: a typo ("Spam") must not drop its mail."""
    if not folder.is_dir():
        raise DataError(
            f"mail folder {folder} does not exist; create it with one subfolder per label "
            f"({', '.join(labels)}), or fill it with `peftflow data deliver --release 2002 "
            f"--into {folder}`"
        )
    present = {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
    unknown = sorted(present - set(labels))
    if unknown:
        raise DataError(
            f"mail folder {folder} has subfolder(s) {', '.join(unknown)} that are not in "
            f"data.labels {list(labels)}: rename them to a label, or add the label to the config"
        )
    # Judged by the name alone: a dot in the folder's own path (~/.local/...) hides nothing.
    files = (p for p in folder.iterdir() if p.is_file())
    stray = sorted(p.name for p in files if not _is_partial(Path(p.name)))
    if stray:
        raise DataError(
            f"mail folder {folder} has file(s) outside any label folder "
            f"({', '.join(stray[:5])}); move each into the subfolder of its label"
        )


def _record(label: str, path: Path, label_dir: Path) -> dict[str, str]:
    parsed = parse_email(path.read_bytes())
    relative = path.relative_to(label_dir).as_posix()
    return {
        "id": f"{label}/{relative}",
        "text": email_text(parsed),
        "label": label,
        "subject": parsed.subject,
        "source": f"folder:{label}",
    }


# ------------------------------------------------------------------ filling a folder


def deliver(release: str, into: str | Path, cache_dir: str | Path) -> dict[str, int]:
    """Copy one SpamAssassin release's messages into ``into/<label>/``; return new per label.

    Idempotent: a message already there (same name) is not copied again. Each file is
    written under a ``.part`` name and renamed, so a concurrent ingest sees it whole or not
    at all.
    """
    if release not in RELEASES:
        raise ConfigError(
            f"unknown SpamAssassin release {release!r}; releases: {', '.join(RELEASES)}"
        )
    corpus = fetch_spamassassin(Path(cache_dir))
    into = Path(into)
    added = {label: 0 for label in sorted(set(GROUP_LABELS.values()))}
    for group in RELEASES[release]:
        label = GROUP_LABELS[group]
        target_dir = into / label / group
        target_dir.mkdir(parents=True, exist_ok=True)
        for source in sorted((corpus / group).glob("*.txt")):
            added[label] += _copy_whole(source, target_dir / source.name)
    return added


def _copy_whole(source: Path, target: Path) -> int:
    """Copy via a ``.part`` file and an atomic rename; 0 when the target already exists."""
    if target.exists():
        return 0
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    shutil.copyfile(source, partial)
    os.replace(partial, target)
    return 1
