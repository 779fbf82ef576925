from pathlib import Path

import pytest

from peftflow.data.email_parse import (
    ParsedEmail,
    decode_bytes,
    email_text,
    html_to_text,
    normalise_whitespace,
    parse_email,
)

EMAILS = Path(__file__).parents[1] / "assets" / "data" / "emails"


def parse_file(name: str) -> ParsedEmail:
    return parse_email((EMAILS / name).read_bytes())


def test_multipart_alternative_prefers_plain_text_and_normalises_whitespace():
    parsed = parse_file("multipart_alternative.eml")
    assert parsed.subject == "Weekly digest: résumé tips"
    assert parsed.body == "Hello reader,\n\nHere are this week's tips.\n\nBye!"


def test_html_only_mail_becomes_visible_text():
    parsed = parse_file("html_only.eml")
    assert parsed.subject == "WIN BIG"
    assert parsed.body == (
        "Save 70% today\n\n"
        "Fish & chips for 5€ — café open now.\nSecond line\n\n"
        "Cell A Cell B\n\n"
        "Click here"
    )
    for hidden in ("tracking", "color: red", "Hidden title", "a comment", "<"):
        assert hidden not in parsed.body


def test_base64_and_quoted_printable_parts_are_decoded_and_attachments_skipped():
    parsed = parse_file("base64_qp.eml")
    assert parsed.subject == "Grüße and café"  # two encoded words, utf-8 and latin-1
    assert parsed.body == (
        "Grüße aus Köln — the meeting moved to Friday.\n\n"
        "Price: 100 € per seat, café included.\n"
        "A long line that is soft = broken by the encoder because it is longer than "
        "seventy-six characters."
    )
    assert "ATTACHED NOTES" not in parsed.body
    assert "PNG" not in parsed.body


def test_iso_8859_1_body_and_raw_8bit_subject():
    raw = (
        b"Subject: Gambler wins \xa37,000\n"
        b"Content-Type: text/plain; charset=iso-8859-1\n"
        b"Content-Transfer-Encoding: 8bit\n\n"
        b"Na\xefve caf\xe9 cr\xe8me\n"
    )
    assert parse_email(raw) == ParsedEmail(subject="Gambler wins £7,000", body="Naïve café crème")


@pytest.mark.parametrize(
    ("charset", "body", "expected"),
    [
        ("x-unknown-8bit", "naïve résumé".encode("latin-1"), "naïve résumé"),  # latin-1 fallback
        ("x-unknown-8bit", "naïve résumé".encode(), "naïve résumé"),  # utf-8 first
        ("us-ascii", "café".encode("latin-1"), "café"),  # 8-bit under a 7-bit label
        ("utf-8", b"bad \xff byte", "bad \ufffd byte"),  # known charset: replace errors
        ("base64", b"plain words", "plain words"),  # a codec, but not a text encoding
    ],
)
def test_broken_or_unknown_charsets_decode_without_raising(charset, body, expected):
    raw = f"Subject: x\nContent-Type: text/plain; charset={charset}\n\n".encode() + body
    assert parse_email(raw).body == expected


def test_encoded_word_with_unknown_charset_keeps_the_text():
    assert parse_email(b"Subject: =?x-bogus?Q?hello?= world\n\nbody\n").subject == "hello world"


def test_header_that_crashes_the_modern_parser_falls_back_to_compat32():
    # policy.default raises IndexError on this RFC 2231 parameter (stdlib bug).
    raw = (
        b"Subject: =?utf-8?q?caf=C3=A9?=\n"
        b"Content-Type: text/plain; charset*=\"utf-8''\"\n\n"
        b"na\xc3\xafve body\n"
    )
    assert parse_email(raw) == ParsedEmail(subject="café", body="naïve body")


def test_folded_subject_is_unfolded_and_missing_subject_is_empty():
    assert parse_email(b"Subject: first\n  second\tthird\n\nx\n").subject == "first second third"
    assert parse_email(b"From: a@b.c\n\nonly a body\n") == ParsedEmail("", "only a body")


def test_email_text_joins_subject_and_body():
    assert email_text(ParsedEmail("Hi", "Body line")) == "Hi\n\nBody line"
    assert email_text(ParsedEmail("", "Body line")) == "Body line"
    assert email_text(ParsedEmail("Only subject", "")) == "Only subject"


def test_normalise_whitespace():
    text = "  a \t b\xa0c \r\n\r\n\r\n\n  d\x00e\x07  \n\n\n"
    assert normalise_whitespace(text) == "a b c\n\nde"


def test_decode_bytes_falls_back_in_order():
    assert decode_bytes("żółw".encode("iso-8859-2"), "iso-8859-2") == "żółw"
    assert decode_bytes("żółw".encode(), None) == "żółw"
    assert decode_bytes(b"\xe9t\xe9", "no-such-charset") == "été"


def test_html_to_text_separates_blocks_but_not_inline_tags():
    assert html_to_text("<p>one <i>two</i></p><p>three</p>").split("\n")[:2] == [
        "one two",
        "three",
    ]
