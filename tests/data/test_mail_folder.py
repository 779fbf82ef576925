"""A labelled mail folder that grows (data.source "folder") and its SpamAssassin delivery."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from peftflow.config.sections import DataConfig
from peftflow.data.ingest import ingest
from peftflow.data.mail_folder import deliver, load_mail_folder
from peftflow.data.spamassassin import RELEASES, SPAMASSASSIN_VERSION
from peftflow.errors import ConfigError, DataError

LABELS = ("ham", "spam")


def mail(subject: str, body: str) -> bytes:
    return f"From: a@example.org\nSubject: {subject}\n\n{body}\n".encode()


def drop(folder: Path, label: str, name: str, subject: str, body: str = "hello") -> Path:
    path = folder / label / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(mail(subject, body))
    return path


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    drop(folder, "ham", "1.eml", "lunch on friday", "see you at noon")
    drop(folder, "ham", "2019/2.eml", "minutes", "attached are the minutes")
    drop(folder, "spam", "3.eml", "WIN CASH NOW", "click here")
    return folder


def test_each_message_becomes_a_labelled_row_with_a_stable_id(inbox):
    table = load_mail_folder(inbox, LABELS)

    assert list(table["id"]) == ["ham/1.eml", "ham/2019/2.eml", "spam/3.eml"]
    assert list(table["label"]) == ["ham", "ham", "spam"]
    assert list(table["subject"]) == ["lunch on friday", "minutes", "WIN CASH NOW"]
    assert table.loc[2, "text"] == "WIN CASH NOW\n\nclick here"
    assert set(table["source"]) == {"folder:ham", "folder:spam"}


def test_copies_still_being_written_are_skipped(inbox):
    drop(inbox, "spam", "4.eml.part", "half a mess")
    drop(inbox, "spam", "5.eml.tmp", "half a mess")
    drop(inbox, "ham", ".6.eml", "hidden")
    drop(inbox, "ham", ".sync/7.eml", "in a hidden folder")

    assert len(load_mail_folder(inbox, LABELS)) == 3


@pytest.mark.parametrize(
    ("arrange", "message"),
    [
        (lambda f: drop(f, "Spam", "9.eml", "x"), "subfolder(s) Spam that are not in data.labels"),
        (lambda f: (f / "loose.eml").write_bytes(b"x"), "outside any label folder (loose.eml)"),
    ],
)
def test_a_misplaced_message_is_an_error_not_a_silent_drop(inbox, arrange, message):
    arrange(inbox)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_mail_folder(inbox, LABELS)


def test_a_stray_file_is_refused_also_below_a_hidden_parent_folder(tmp_path):
    inbox = tmp_path / ".local" / "inbox"
    drop(inbox, "ham", "1.eml", "hello")
    (inbox / "loose.eml").write_bytes(b"x")
    with pytest.raises(DataError, match=r"outside any label folder \(loose.eml\)"):
        load_mail_folder(inbox, LABELS)


def test_a_missing_or_empty_folder_says_how_to_fill_it(tmp_path):
    with pytest.raises(DataError, match="does not exist.*peftflow data deliver"):
        load_mail_folder(tmp_path / "nowhere", LABELS)
    (tmp_path / "empty" / "ham").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no messages.*peftflow data deliver"):
        load_mail_folder(tmp_path / "empty", LABELS)


def test_a_folder_source_needs_a_path():
    with pytest.raises(ValueError, match="source 'folder' needs `path`"):
        DataConfig(source="folder")


def test_new_mail_gives_a_new_data_version_and_unchanged_mail_the_same(inbox, tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    cfg = DataConfig(source="folder", path=str(inbox))

    first = ingest(cfg, root, push=False)
    again = ingest(cfg, root, push=False)
    drop(inbox, "spam", "8.eml", "cheap meds")
    grown = ingest(cfg, root, push=False)

    assert again.data_md5 == first.data_md5
    assert grown.data_md5 != first.data_md5
    assert (first.n_rows, grown.n_rows) == (3, 4)
    assert grown.label_counts == {"ham": 2, "spam": 2}


def fake_corpus(cache: Path) -> Path:
    """The extracted-corpus layout fetch_spamassassin returns, two messages per group."""
    data = cache / SPAMASSASSIN_VERSION / "package" / "data"
    for groups in RELEASES.values():
        for group in groups:
            (data / group).mkdir(parents=True)
            for number in (1, 2):
                (data / group / f"0000{number}.abc.txt").write_bytes(mail(group, "body"))
    return data


def test_releases_arrive_one_after_the_other_and_redelivery_adds_nothing(tmp_path):
    fake_corpus(tmp_path / "cache")
    inbox = tmp_path / "inbox"

    first = deliver("2002", inbox, tmp_path / "cache")
    repeated = deliver("2002", inbox, tmp_path / "cache")
    table_2002 = load_mail_folder(inbox, LABELS)
    second = deliver("2003", inbox, tmp_path / "cache")

    assert first == {"ham": 4, "spam": 2}  # easy-ham-1 + hard-ham-1, spam-1
    assert repeated == {"ham": 0, "spam": 0}
    assert sorted(set(table_2002["subject"])) == ["easy-ham-1", "hard-ham-1", "spam-1"]
    assert second == {"ham": 2, "spam": 2}
    assert len(load_mail_folder(inbox, LABELS)) == 10
    assert not list(inbox.rglob("*.part")), "every copy was renamed into place"


def test_an_unknown_release_names_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown SpamAssassin release '2004'.*2002, 2003"):
        deliver("2004", tmp_path / "inbox", tmp_path / "cache")
