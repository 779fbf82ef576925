"""Generation examples: an email body as the prompt, its cleaned Subject line as the response.

The ingested SpamAssassin table stays in the classification schema (one DVC data
version for the classifier and the generator); this module derives the subject
view from it. A user's own prompt/response table already has the generation
columns and passes through unchanged.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

import re

import pandas as pd

from peftflow.data.schema import TABLE_COLUMNS
from peftflow.errors import DataError

# id: unique and stable; prompt: the model input (instruction or document);
# response: the target text; source: group or file name.
GENERATION_COLUMNS: tuple[str, ...] = ("id", "prompt", "response", "source")

# One leading reply/forward marker ("Re:", "RE[2]:", "Re^2:", "Fwd:", "AW:", "Antw:", ...)
# or one leading list tag ("[ILUG]", "[ zzzzteana ]"). Tags hold name-like characters
# only, so a leading "[see http://x]" is not mistaken for a list name.
_LEADING_MARKER = re.compile(
    r"^(?:(?:re|fwd?|aw|sv|antw)(?:\[\d+\]|\^\d+)?\s*:|\[\s*[\w.+\- ]{1,40}?\s*\])\s*",
    re.IGNORECASE,
)
_TRAILING_FWD = re.compile(r"\s*\(fwd\)\s*$", re.IGNORECASE)


def clean_subject(subject: str) -> str:
    """Strip leading Re:/Fwd:-style markers and list tags (any order, repeated) and "(fwd)"."""
    cleaned = " ".join(subject.split())
    previous = None
    # Markers nest in any order ("Re: [ILUG] Re: [ILUG] x"), so strip until nothing changes.
    while cleaned != previous:
        previous = cleaned
        cleaned = _LEADING_MARKER.sub("", cleaned, count=1)
        cleaned = _TRAILING_FWD.sub("", cleaned)
    return cleaned.strip()


def email_body(text: str, subject: str) -> str:
    """The body of an ingested ``text`` (``subject + blank line + body``, or just the body)."""
    subject = subject.strip()
    if not subject or not text.startswith(subject):
        return text.strip()
    rest = text[len(subject) :]
    if rest and not rest.startswith("\n\n"):
        # The text does not start with a subject line after all ("Hi" vs "Hi there ...").
        return text.strip()
    return rest.strip()


def subject_examples(table: pd.DataFrame) -> pd.DataFrame:
    """Ham emails as (prompt=body, response=cleaned subject) rows, sorted by id.

    Rows dropped are counted in ``attrs``: ``dropped_spam`` (label other than
    "ham"), ``dropped_empty_subject`` and ``dropped_empty_body``.
    """
    _require_columns(table, TABLE_COLUMNS, "the classification schema")
    ham = table[table["label"].astype(str) == "ham"]
    prompts = [email_body(str(t), str(s)) for t, s in zip(ham["text"], ham["subject"], strict=True)]
    responses = [clean_subject(str(s)) for s in ham["subject"]]
    frame = pd.DataFrame(
        {
            "id": ham["id"].astype(str).to_numpy(),
            "prompt": prompts,
            "response": responses,
            "source": ham["source"].astype(str).to_numpy(),
        },
        columns=list(GENERATION_COLUMNS),
    )
    empty_response = frame["response"].str.strip() == ""
    empty_prompt = (frame["prompt"].str.strip() == "") & ~empty_response
    kept = frame[~(empty_response | empty_prompt)]
    out = kept.sort_values("id", kind="stable").reset_index(drop=True)
    out.attrs.update(
        dropped_spam=len(table) - len(ham),
        dropped_empty_subject=int(empty_response.sum()),
        dropped_empty_body=int(empty_prompt.sum()),
    )
    return out


def generation_examples(table: pd.DataFrame) -> pd.DataFrame:
    """Any supported table as generation rows: prompt/response tables as is, emails as subjects."""
    if set(GENERATION_COLUMNS) <= set(table.columns):
        return table[list(GENERATION_COLUMNS)]
    if {"subject", "label"} <= set(table.columns):
        return subject_examples(table)
    raise DataError(
        f"cannot build generation examples from a table with columns {list(table.columns)}; "
        f"expected either {list(GENERATION_COLUMNS)} (a prompt/response table: set "
        "data.prompt_column / data.response_column when ingesting it) or the ingested email "
        f"schema {list(TABLE_COLUMNS)} (subject lines are generated from it)"
    )


def _require_columns(table: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise DataError(
            f"the table lacks column(s) {missing} of {what} (it has {list(table.columns)}); "
            "re-ingest it so it has all of them"
        )
