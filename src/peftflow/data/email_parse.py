"""Turn one raw RFC 822 email (bytes) into the subject and readable body text.

Real mail is messy: mislabelled or unknown charsets, 8-bit bytes in headers,
HTML-only spam, base64 attachments. Parsing must never fail on a single odd
message (a corpus has thousands), so every decoding step degrades to a lossy
but readable result instead of raising.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

import codecs
import email
import email.errors
import email.header
import email.policy
import re
import warnings
from dataclasses import dataclass
from email.message import Message

from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning, XMLParsedAsHTMLWarning

# The stdlib header parser of policy.default raises a mix of exception types on
# malformed headers (a known weakness of email._header_value_parser).
_HEADER_ERRORS = (email.errors.MessageError, ValueError, IndexError, AttributeError, TypeError)

_INVISIBLE_TAGS = ("script", "style", "noscript", "template", "head")
# Tags that end a line when rendered; everything else is inline text.
_BLOCK_TAGS = (
    *("p", "div", "br", "hr", "tr", "li", "ul", "ol", "table", "blockquote", "pre"),
    *("h1", "h2", "h3", "h4", "h5", "h6", "title", "center", "form", "dd", "dt"),
)
_CELL_TAGS = ("td", "th")
# C0 controls other than tab/newline/vertical space: binary debris from broken mail.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0e-\x1b\x7f]")


@dataclass(frozen=True)
class ParsedEmail:
    subject: str
    body: str


def parse_email(raw: bytes) -> ParsedEmail:
    """Parse raw mail bytes; prefers the text/plain parts, else the HTML ones as text."""
    try:
        message = email.message_from_bytes(raw, policy=email.policy.default)
        body = _body_text(message)
    except _HEADER_ERRORS:
        # compat32 keeps headers as plain strings, so it cannot choke on them.
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        body = _body_text(message)
    subject = " ".join(_subject(message).split())  # unfold and collapse spaces
    return ParsedEmail(subject=subject, body=normalise_whitespace(body))


def email_text(parsed: ParsedEmail) -> str:
    """The model input: subject, blank line, body (just the body when there is no subject)."""
    return f"{parsed.subject}\n\n{parsed.body}".strip()


def normalise_whitespace(text: str) -> str:
    """Drop control characters, trim every line, collapse space runs and blank-line runs.

    Mail bodies are full of layout whitespace (indentation, NBSP, table cells) that
    only costs tokens; one blank line is kept as the paragraph separator.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_CHARS.sub("", text)
    # [^\S\n] is any whitespace but newline: tabs, NBSP, form feeds, unicode spaces.
    lines = (re.sub(r"[^\S\n]+", " ", line).strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode with the declared charset, else as UTF-8, else as latin-1 (which never fails).

    A declared "us-ascii" is ignored: old mail often carries 8-bit bytes under it,
    and UTF-8 decodes pure ASCII identically.
    """
    if _codec_name(charset) not in (None, "ascii"):
        try:
            return data.decode(charset, errors="replace")
        except (LookupError, UnicodeError):
            pass  # a non-text codec ("base64") or one without a "replace" mode ("idna")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _codec_name(charset: str | None) -> str | None:
    if not charset:
        return None
    try:
        return codecs.lookup(charset).name
    except LookupError:
        return None  # unknown names such as "x-unknown" or "default"


def html_to_text(html: str) -> str:
    """Visible text of an HTML document: no tags, scripts or styles; entities decoded."""
    with warnings.catch_warnings():
        # Short spam bodies such as a lone URL make bs4 warn that it "looks like a URL".
        warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
        warnings.simplefilter("ignore", XMLParsedAsHTMLWarning)
        soup = BeautifulSoup(html, "html.parser")
    for tag in soup.find_all(_INVISIBLE_TAGS):
        tag.decompose()
    for tag in soup.find_all(_BLOCK_TAGS):
        tag.insert_after("\n")
    for tag in soup.find_all(_CELL_TAGS):
        tag.insert_after(" ")
    return soup.get_text()


def _subject(message: Message) -> str:
    """The decoded Subject; raw 8-bit bytes are decoded too (policy.default makes them U+FFFD)."""
    raw = next((value for name, value in message.raw_items() if name.lower() == "subject"), None)
    if raw is None:
        return ""
    value = _undo_surrogates(raw)
    try:
        return str(email.policy.default.header_factory("subject", value))
    except _HEADER_ERRORS:
        return _decode_encoded_words(value)


def _decode_encoded_words(value: str) -> str:
    """compat32 decoding of =?charset?q?...?= words, tolerant of unknown charsets."""
    chunks = email.header.decode_header(value)
    return "".join(
        chunk
        if isinstance(chunk, str)
        # decode_header hands back the plain (non-encoded) runs as raw-unicode-escape bytes.
        else chunk.decode("raw-unicode-escape")
        if charset is None
        else decode_bytes(chunk, charset)
        for chunk, charset in chunks
    )


def _undo_surrogates(text: str) -> str:
    """The parser keeps raw 8-bit header bytes as surrogate escapes: decode them for real."""
    if not any("\udc80" <= char <= "\udcff" for char in text):
        return text
    return decode_bytes(text.encode("ascii", errors="surrogateescape"), None)


def _body_text(message: Message) -> str:
    plain, html = _text_parts(message)
    if any(part.strip() for part in plain):
        return "\n\n".join(plain)
    return "\n\n".join(html_to_text(part) for part in html)


def _text_parts(message: Message) -> tuple[list[str], list[str]]:
    """Decoded inline text/plain and text/html parts, attachments and binaries skipped."""
    plain: list[str] = []
    html: list[str] = []
    for part in message.walk():
        if part.is_multipart() or part.get_content_disposition() == "attachment":
            continue
        content_type = part.get_content_type()
        if content_type not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True) or b""
        text = decode_bytes(payload, part.get_content_charset())
        (plain if content_type == "text/plain" else html).append(text)
    return plain, html
