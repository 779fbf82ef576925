"""Loaders that turn each supported source into the standard table (see :mod:`.schema`).

Loaders only read and reshape; whether labels, duplicates and lengths are
acceptable is decided later by the Great Expectations checks stage.

Depends on: config.
"""

from __future__ import annotations

import io
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pandas as pd

from peftflow.config import DataConfig
from peftflow.data.mail_folder import load_mail_folder
from peftflow.data.schema import make_table
from peftflow.data.spamassassin import fetch_spamassassin, load_spamassassin
from peftflow.data.subjects import GENERATION_COLUMNS
from peftflow.errors import ConfigError, DataError, FetchError

SMS_ZIP_MEMBER = "SMSSpamCollection"
SMS_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
TABLE_READERS = {
    ".csv": lambda path: pd.read_csv(path, dtype=str, keep_default_na=False),
    ".parquet": pd.read_parquet,
    ".jsonl": lambda path: pd.read_json(path, lines=True, dtype=False),
    ".json": lambda path: pd.read_json(path, dtype=False),
}
_MAX_LISTED = 10  # bad rows/lines named in an error message
# How a user's table is read: labelled texts (classification) or prompt/response pairs.
LAYOUTS = ("labelled", "pairs")
_CLASSIFICATION_FIELDS = "data.text_column / data.label_column"
_GENERATION_FIELDS = "data.prompt_column / data.response_column"


def load_dataset(cfg: DataConfig, cache_dir: Path, layout: str = "labelled") -> pd.DataFrame:
    """Load the configured source as one table (no label/duplicate checks here).

    Every source gives the standard labelled table, except a user's table read as
    prompt/response ``pairs`` (task "generation"), which gives :data:`GENERATION_COLUMNS`.
    SpamAssassin stays labelled for both tasks: the subject-line view is derived later
    (``generation_examples``), so both tasks share one data version.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown table layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    if layout == "pairs" and cfg.source == "table":
        return load_generation_table(cfg.path, cfg.prompt_column, cfg.response_column)
    if cfg.source == "spamassassin":
        return load_spamassassin(fetch_spamassassin(Path(cache_dir)))
    if cfg.source == "sms":
        return load_sms_collection(cfg.path or cfg.url)
    if cfg.source == "folder":
        return load_mail_folder(cfg.path, cfg.labels)
    return load_table(cfg.path, cfg.text_column, cfg.label_column)


def load_sms_collection(path_or_url: str) -> pd.DataFrame:
    """UCI SMS Spam Collection (``label<TAB>text`` lines): raw file, or its zip by path or URL."""
    raw, source = _read_sms_bytes(str(path_or_url))
    lines = _decode_text(raw).splitlines()
    records, bad = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        if not tab or not label.strip() or not text.strip():
            bad.append(number)
            continue
        records.append(_row(f"sms-{number:06d}", text.strip(), label.strip(), source))
    if bad:
        raise DataError(
            f"{path_or_url}: {len(bad)} line(s) are not `label<TAB>text` "
            f"(line {_list_some(bad)}); fix or remove them"
        )
    if not records:
        raise DataError(f"{path_or_url} holds no `label<TAB>text` lines; is it the right file?")
    return make_table(records)


def load_table(path: str | Path, text_column: str, label_column: str) -> pd.DataFrame:
    """A user's .csv/.parquet/.jsonl/.json file with named text and label columns."""
    path = Path(path)
    frame = _read_user_table(path)
    _require_columns(frame, path, (text_column, label_column), _CLASSIFICATION_FIELDS)
    texts, labels = frame[text_column], frame[label_column]
    _reject_missing(path, texts.isna() | labels.isna() | _blank(labels), "text or label")
    return make_table(
        _row(f"row-{number:06d}", str(text), str(label), path.name)
        for number, (text, label) in enumerate(zip(texts, labels, strict=True), start=1)
    )


def load_generation_table(
    path: str | Path, prompt_column: str, response_column: str
) -> pd.DataFrame:
    """A user's instruction/response (or document/summary) file as :data:`GENERATION_COLUMNS`.

    Ids are ``row-NNNNNN`` by file row, as :func:`load_table` makes them; rows are
    sorted by id, so the written file depends only on the content.
    """
    path = Path(path)
    frame = _read_user_table(path)
    _require_columns(frame, path, (prompt_column, response_column), _GENERATION_FIELDS)
    prompts, responses = frame[prompt_column], frame[response_column]
    _reject_missing(path, prompts.isna() | responses.isna(), "prompt or response")
    table = pd.DataFrame(
        {
            "id": [f"row-{number:06d}" for number in range(1, len(frame) + 1)],
            "prompt": prompts.astype(str).to_numpy(),
            "response": responses.astype(str).to_numpy(),
            "source": path.name,
        },
        columns=list(GENERATION_COLUMNS),
    )
    table = table.astype({column: "str" for column in GENERATION_COLUMNS})
    return table.sort_values("id", kind="stable").reset_index(drop=True)


def _read_user_table(path: Path) -> pd.DataFrame:
    return read_table_file(path, "data file", "data.path")


def read_table_file(path: Path, role: str, setting: str) -> pd.DataFrame:
    """A user's CSV/parquet/JSONL/JSON file as read, or a DataError that names the fix.

    ``role`` says what the file is for ("data file", "input file") and ``setting`` where
    its path came from ("data.path", "--input"), for the messages.
    """
    path = Path(path)
    reader = TABLE_READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; "
            f"convert it to one of {', '.join(TABLE_READERS)}"
        )
    if not path.is_file():
        raise DataError(f"{role} {path} does not exist; set {setting} to an existing file")
    if path.stat().st_size == 0:
        raise DataError(f"{role} {path} is empty (0 bytes); point {setting} at the real file")
    try:
        return reader(path)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text ({_first_non_utf8_line(path)}); re-save the file as "
            "UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`)"
        ) from err
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise DataError(
            f"could not read {path}: {err}; check that it is a valid {path.suffix} file"
        ) from err


def _first_non_utf8_line(path: Path) -> str:
    """Where a file first stops being UTF-8, in words: its line and the offending bytes."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {number}: byte {line[err.start : err.start + 1]!r} ({err.reason})"
    return "an invalid byte sequence"


def _row(row_id: str, text: str, label: str, source: str) -> dict[str, str]:
    return {"id": row_id, "text": text, "label": label, "subject": "", "source": source}


def _read_sms_bytes(path_or_url: str) -> tuple[bytes, str]:
    """The collection's bytes and file name, unzipped when it is the UCI zip."""
    data, name = _read_local_or_remote(path_or_url)
    if not zipfile.is_zipfile(io.BytesIO(data)):
        if data.startswith(b"PK\x03\x04"):  # a zip's first bytes, but no readable directory
            raise DataError(
                f"{path_or_url} is a truncated or damaged zip archive ({len(data)} bytes); "
                "download it again"
            )
        return data, name
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        if SMS_ZIP_MEMBER not in archive.namelist():
            raise DataError(
                f"{path_or_url} has no {SMS_ZIP_MEMBER!r} member (it has {archive.namelist()}); "
                f"use the UCI zip ({SMS_URL}) or the extracted file"
            )
        return archive.read(SMS_ZIP_MEMBER), SMS_ZIP_MEMBER


def _read_local_or_remote(path_or_url: str) -> tuple[bytes, str]:
    if path_or_url.startswith(("http://", "https://")):
        return _download(path_or_url), Path(urllib.parse.urlsplit(path_or_url).path).name
    path = Path(path_or_url)
    if not path.is_file():
        raise DataError(f"SMS collection {path} does not exist; set data.path or data.url")
    return path.read_bytes(), path.name


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except OSError as err:  # URLError and timeouts are OSErrors
        raise FetchError(
            f"could not download {url}: {err}; download it yourself and set data.path to the file"
        ) from err


def _decode_text(raw: bytes) -> str:
    """UTF-8 (with or without BOM), else latin-1 (every byte sequence is valid latin-1)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _require_columns(
    frame: pd.DataFrame, path: Path, columns: tuple[str, ...], fields: str
) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise DataError(
            f"{path} has no column(s) {missing}; available columns: {list(frame.columns)}; "
            f"set {fields} to the right names"
        )


def _blank(values: pd.Series) -> pd.Series:
    """Values that are empty or whitespace once read as text (CSV keeps "" as a value)."""
    return values.astype(str).str.strip().eq("") & values.notna()


def _reject_missing(path: Path, missing: pd.Series, what: str) -> None:
    """A null value would silently become the string "nan": refuse it."""
    if missing.any():
        rows = [int(position) + 1 for position in missing.to_numpy().nonzero()[0]]
        raise DataError(
            f"{path}: {len(rows)} row(s) have an empty {what} (data row "
            f"{_list_some(rows)}); fill or drop them"
        )


def _list_some(numbers: list[int]) -> str:
    shown = ", ".join(str(number) for number in numbers[:_MAX_LISTED])
    hidden = len(numbers) - _MAX_LISTED
    return f"{shown} and {hidden} more" if hidden > 0 else shown
