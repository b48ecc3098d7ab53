"""fetchpool.charset: encodings determined in browsers' order, with WHATWG names."""

from __future__ import annotations

import codecs

import pytest
import webencodings
from fetchpool import charset
from hypothesis import given
from hypothesis import strategies as st

FRENCH = "Les élèves étaient très contents de découvrir la forêt près du château. « Où est le garçon ? »"
JAPANESE = "こんにちは世界、これは日本語のテキストです。文字コードの判定を試験しています。"
CHINESE = "你好世界，这是中文文本。我们正在测试编码检测。服务器没有声明编码。"  # noqa: RUF001
RUSSIAN = "Привет, мир! Это тестовая страница на русском языке для проверки кодировки."


def _page(text: str, head: str = "") -> str:
    return f"<!DOCTYPE html><html><head>{head}<title>t</title></head><body><p>{text}</p></body></html>"


@pytest.mark.parametrize(("content_type", "body", "expected"), [
    # 1. A byte order mark beats everything, even a header that says otherwise.
    ("text/html; charset=iso-8859-1", codecs.BOM_UTF8 + "é".encode(), "utf-8"),
    ("text/plain", codecs.BOM_UTF16_LE + "hi".encode("utf-16-le"), "utf-16le"),
    ("text/plain", codecs.BOM_UTF16_BE + "hi".encode("utf-16-be"), "utf-16be"),
    # 2. The header's charset, by its WHATWG label (iso-8859-1 and ascii mean windows-1252).
    ("text/html; charset=ISO-8859-1", b"caf\xe9", "windows-1252"),
    ('text/html; charset="Shift_JIS"', _page(JAPANESE).encode("shift_jis"), "shift_jis"),
    ("text/html;charset=gb2312", _page(CHINESE).encode("gbk"), "gbk"),
    ("application/json; charset=utf-8", b'{"a": 1}', "utf-8"),
    # 3. <meta charset>, http-equiv and the XML declaration, when the header says nothing.
    ("text/html", _page(JAPANESE, '<meta charset="shift_jis">').encode("shift_jis"), "shift_jis"),
    ("text/html", _page(FRENCH, '<meta http-equiv="Content-Type" content="text/html; charset=windows-1252">')
     .encode("cp1252"), "windows-1252"),
    ("application/xml", b'<?xml version="1.0" encoding="ISO-8859-2"?><a>\xb1</a>', "iso-8859-2"),
    (None, _page(RUSSIAN, '<meta charset="koi8-r">').encode("koi8-r"), "koi8-r"),
    ("text/html", _page("x", '<meta charset="utf-16">').encode(), "utf-8"),  # as browsers: not UTF-16
    # A bogus header charset is ignored, and the rest of the order applies.
    ("text/html; charset=no-such-thing", _page(FRENCH, '<meta charset="windows-1252">').encode("cp1252"),
     "windows-1252"),
    # 4. Detection: UTF-8 when the bytes are UTF-8, else uchardet.
    ("text/html", _page(JAPANESE).encode(), "utf-8"),
    ("text/plain", b"plain ascii", "utf-8"),
    ("text/html", _page(FRENCH).encode("cp1252"), "windows-1252"),
    ("text/html", _page(JAPANESE).encode("shift_jis"), "shift_jis"),
    ("text/html", _page(JAPANESE).encode("euc-jp"), "euc-jp"),
    ("text/html", _page(CHINESE).encode("gbk"), "gb18030"),
    ("text/html", _page(RUSSIAN).encode("cp1251"), "windows-1251"),
    # Not text: no encoding.
    ("image/png", b"\x89PNG\r\n", ""),
    ("application/octet-stream", b"abc", ""),
    ("application/pdf; charset=utf-8", b"%PDF", ""),
])
def test_detect(content_type: str | None, body: bytes, expected: str) -> None:
    assert charset.detect(content_type, body) == expected


@pytest.mark.parametrize(("text", "python"), [(FRENCH, "cp1252"), (JAPANESE, "shift_jis"), (CHINESE, "gbk"),
                                              (RUSSIAN, "koi8-r"), (JAPANESE, "euc-jp")])
def test_decoding_what_was_detected_gives_the_text_back(text: str, python: str) -> None:
    body = _page(text).encode(python)
    assert charset.decode(body, charset.detect("text/html", body)) == _page(text)


def test_decode_drops_a_bom_and_replaces_what_does_not_decode() -> None:
    assert charset.decode(codecs.BOM_UTF8 + b"ok", "utf-8") == "ok"
    assert charset.decode(b"a\xffb", "utf-8") == "a\ufffdb"
    assert charset.decode(b"\x82\xa0", "shift_jis") == "あ"
    with pytest.raises(LookupError):
        charset.decode(b"x", "no-such-encoding")


def test_every_browser_encoding_maps_to_a_python_codec_and_back() -> None:
    names = set(webencodings.LABELS.values()) - {"replacement", "x-user-defined"}
    for name in names:
        assert charset.whatwg_name(charset.python_codec(name)) in (name, name.removesuffix("-i")), name


@given(st.binary(max_size=2048), st.sampled_from([None, "text/html", "text/plain; charset=utf-8", "image/gif"]))
def test_detect_and_decode_never_fail(body: bytes, content_type: str | None) -> None:
    encoding = charset.detect(content_type, body)
    if encoding:
        charset.decode(body, encoding).encode("utf-8")  # valid for a proto string: no lone surrogate
    else:
        assert content_type == "image/gif"
