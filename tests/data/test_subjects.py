"""Subject-line generation examples: cleaning subjects, finding bodies, picking the table kind."""

from __future__ import annotations

import pandas as pd
import pytest

from peftflow.data.schema import TABLE_COLUMNS
from peftflow.data.spamassassin import load_spamassassin
from peftflow.data.subjects import (
    GENERATION_COLUMNS,
    clean_subject,
    email_body,
    generation_examples,
    subject_examples,
)
from peftflow.errors import DataError
from tests.assets.data.fake_corpus import FAKE_COUNTS, write_fake_corpus


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("Re: [ILUG] Re: [ILUG] foo", "foo"),
        ("RE: re: Re[2]: Re^2: meeting moved", "meeting moved"),
        ("Fwd: FWD: Fw: FW: the plan", "the plan"),
        ("AW: SV: Antw: Hallo", "Hallo"),
        ("[SAtalk] Re: [Razor-users] Re: spam rule", "spam rule"),
        ("[ zzzzteana ]  Re:   Loch   Ness", "Loch Ness"),
        ("Re: [Spambayes] training tips (fwd)", "training tips"),
        ("Cool article (Fwd)", "Cool article"),
        ("Re:no space after colon", "no space after colon"),
        ("Fix [bug] now", "Fix [bug] now"),
        ("Reasons: why it fails", "Reasons: why it fails"),
        ("  Plain   subject\t line ", "Plain subject line"),
        ("Re: [ILUG]", ""),
        ("", ""),
    ],
)
def test_clean_subject_strips_leading_markers_and_tags(raw, cleaned):
    assert clean_subject(raw) == cleaned


def test_email_body_removes_the_subject_line_only_when_it_leads():
    assert email_body("Hello\n\nThe body.\n\nMore.", "Hello") == "The body.\n\nMore."
    assert email_body("Only a body", "") == "Only a body"  # no subject: text is the body
    assert email_body("Hello", "Hello") == ""  # subject without a body
    # A subject that is only a prefix of the first line is not a subject line.
    assert email_body("Hello there\n\nbody", "Hello") == "Hello there\n\nbody"


def email_table(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    """(id, label, subject, body) -> the ingested schema, text made as ingestion makes it."""
    return pd.DataFrame(
        [
            {
                "id": row_id,
                "text": f"{subject}\n\n{body}".strip(),
                "label": label,
                "subject": subject,
                "source": "test",
            }
            for row_id, label, subject, body in rows
        ],
        columns=list(TABLE_COLUMNS),
    )


def test_subject_examples_keeps_ham_with_a_subject_and_a_body():
    table = email_table(
        [
            ("m3", "ham", "Re: [ILUG] Kernel build", "It fails on line 3."),
            ("m1", "ham", "Lunch?", "Friday at noon"),
            ("m2", "spam", "WIN NOW", "Click here"),
            ("m4", "ham", "", "A body with no subject"),
            ("m5", "ham", "Re: [SAtalk]", "Subject is only markers"),
            ("m6", "ham", "Just a subject", ""),
        ]
    )

    examples = subject_examples(table)

    assert list(examples.columns) == list(GENERATION_COLUMNS)
    assert examples["id"].tolist() == ["m1", "m3"]
    assert examples["prompt"].tolist() == ["Friday at noon", "It fails on line 3."]
    assert examples["response"].tolist() == ["Lunch?", "Kernel build"]
    assert examples.index.tolist() == [0, 1]
    assert examples.attrs == {
        "dropped_spam": 1,
        "dropped_empty_subject": 2,
        "dropped_empty_body": 1,
    }


def test_subject_examples_from_a_parsed_corpus(tmp_path):
    write_fake_corpus(tmp_path / "data")
    corpus = load_spamassassin(tmp_path / "data", FAKE_COUNTS)

    examples = generation_examples(corpus)

    assert examples["response"].tolist() == [
        "Lunch on Friday?",
        "build failed",
        "Minutes",
        "Your order has shipped",
    ]
    assert examples["prompt"].iloc[1] == "Fixed in r1234, please retry."
    assert examples["prompt"].iloc[3] == "Your order is on its way & will arrive Monday."
    assert examples.attrs["dropped_spam"] == 2


def test_subject_examples_needs_the_whole_email_schema():
    table = pd.DataFrame({"subject": ["Hi"], "label": ["ham"]})
    with pytest.raises(DataError, match=r"lacks column\(s\) \['id', 'text', 'source'\]"):
        subject_examples(table)


def test_generation_examples_passes_prompt_response_tables_through():
    table = pd.DataFrame(
        {
            "source": ["own.csv"],
            "response": ["a summary"],
            "extra": [1],
            "prompt": ["a document"],
            "id": ["row-000001"],
        }
    )

    examples = generation_examples(table)

    assert list(examples.columns) == list(GENERATION_COLUMNS)
    assert examples.iloc[0].tolist() == ["row-000001", "a document", "a summary", "own.csv"]


def test_generation_examples_rejects_other_tables_naming_both_layouts():
    with pytest.raises(DataError) as caught:
        generation_examples(pd.DataFrame({"id": ["1"], "text": ["hi"]}))
    message = str(caught.value)
    assert "columns ['id', 'text']" in message
    assert "['id', 'prompt', 'response', 'source']" in message
    assert "data.prompt_column / data.response_column" in message
