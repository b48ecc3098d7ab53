"""The character encoding of a response body, determined as browsers do, and its decoding.

Order (the WHATWG encoding-sniffing algorithm, as far as a fetcher can follow it):

1. a byte order mark (UTF-8, UTF-16LE, UTF-16BE);
2. the ``charset`` parameter of ``Content-Type``;
3. for HTML and XML, ``<meta charset>`` / ``<meta http-equiv="Content-Type">`` or the XML
   declaration in the first 4 KiB (w3lib's prescan, the one Scrapy uses); a declared UTF-16 means
   UTF-8, as in browsers (a document that declares itself in ASCII is not UTF-16);
4. detection: UTF-8 if the body is valid UTF-8 (ASCII included), else uchardet (Mozilla's
   universal detector) over the first 64 KiB; windows-1252 when it finds nothing browsers support.

Names are WHATWG encoding names in lower case ("utf-8", "windows-1252", "shift_jis", "gbk"),
which Node's ``TextDecoder``, Go's ``htmlindex.Get``, Java's ``Charset.forName`` and
:func:`decode` accept. Bodies whose media type is not text (``image/*``, ``application/pdf``,
``application/octet-stream``, ...) have no encoding (``""``).

Libraries: webencodings (the WHATWG label table and its Python codecs), w3lib (the prescan),
faust-cchardet (uchardet). Pure functions, no I/O.
"""

from __future__ import annotations

import codecs
import functools

import cchardet
import webencodings
from w3lib.encoding import html_body_declared_encoding

__all__ = ["decode", "detect", "is_textual"]

#: Media types outside text/* whose bodies are text.
_TEXT_TYPES = frozenset({
    "application/json", "application/xml", "application/xhtml+xml", "application/javascript",
    "application/ecmascript", "application/x-javascript", "application/x-www-form-urlencoded",
    "application/rss+xml", "application/atom+xml", "image/svg+xml",
})
#: Media types whose first bytes may declare the encoding (""= no Content-Type: sniffed as HTML).
_DECLARING = frozenset({"", "text/html", "application/xhtml+xml", "text/xml", "application/xml"})
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_BE, "utf-16be"), (codecs.BOM_UTF16_LE, "utf-16le"))
#: Bytes the detector looks at: enough for a confident guess, bounded in CPU.
_SAMPLE = 64 * 1024
_FALLBACK = "windows-1252"
_UNUSABLE = frozenset({"replacement", "x-user-defined"})


def _media_type(content_type: str | None) -> tuple[str, str]:
    """(media type in lower case, raw charset parameter or "") of a Content-Type value."""
    if not content_type:
        return "", ""
    media, *params = content_type.split(";")
    charset = ""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip("\"'")
    return media.strip().lower(), charset


def is_textual(content_type: str | None) -> bool:
    """Whether a body of this Content-Type (None: absent) is text (and so has an encoding)."""
    media, _ = _media_type(content_type)
    return (not media or media.startswith("text/") or media in _TEXT_TYPES
            or media.endswith(("+xml", "+json")))


@functools.cache
def _whatwg_by_codec() -> dict[str, str]:
    """Python codec name -> WHATWG name, for the encodings browsers support."""
    table: dict[str, str] = {}
    for name in sorted(set(webencodings.LABELS.values()) - _UNUSABLE):
        table.setdefault(codecs.lookup(webencodings.lookup(name).codec_info.name).name, name)
        table.setdefault(codecs.lookup(name).name if _codec_exists(name) else name, name)
    return table


def _codec_exists(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


def whatwg_name(label: str) -> str:
    """The WHATWG name of an encoding label or Python codec name; "" when browsers have no such
    encoding (or only the "replacement" one)."""
    encoding = webencodings.lookup(label)
    if encoding is not None:
        return "" if encoding.name in _UNUSABLE else encoding.name
    if not _codec_exists(label):
        return ""
    return _whatwg_by_codec().get(codecs.lookup(label).name, "")


def python_codec(name: str) -> str:
    """The Python codec that decodes WHATWG encoding ``name`` as browsers do (shift_jis is
    Windows-31J, big5 is Big5-HKSCS, ...). Raises LookupError for an unknown name."""
    encoding = webencodings.lookup(name)
    if encoding is None or encoding.name in _UNUSABLE:
        raise LookupError(f"unknown encoding {name!r}")
    return encoding.codec_info.name


def detect(content_type: str | None, body: bytes) -> str:
    """The WHATWG name of ``body``'s encoding given its ``Content-Type`` header value (None when
    absent); "" when the media type is not text."""
    if not is_textual(content_type):
        return ""
    for bom, name in _BOMS:
        if body.startswith(bom):
            return name
    media, label = _media_type(content_type)
    declared = whatwg_name(label) if label else ""
    if declared:
        return declared
    if media in _DECLARING:
        found = html_body_declared_encoding(body[:4096])
        declared = whatwg_name(found) if found else ""
        if declared:
            return "utf-8" if declared.startswith("utf-16") else declared
    return _sniff(body)


def _sniff(body: bytes) -> str:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        return "utf-8"
    sample = body[:_SAMPLE]
    if len(body) > _SAMPLE and b"\n" in sample:
        # Cut at a line end so no multi-byte character is split (no trail byte is 0x0A).
        sample = sample[: sample.rindex(b"\n") + 1]
    guess = cchardet.detect(sample).get("encoding")
    return (whatwg_name(guess) if guess else "") or _FALLBACK


def decode(body: bytes, encoding: str) -> str:
    """``body`` as text in WHATWG ``encoding`` (a byte order mark of it is dropped, undecodable
    bytes become U+FFFD). Raises LookupError for an unknown encoding."""
    codec = python_codec(encoding)
    for bom, name in _BOMS:
        if name == encoding and body.startswith(bom):
            body = body[len(bom):]
    return body.decode(codec, "replace")
