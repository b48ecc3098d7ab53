"""Reading a response body within a byte cap, decompressing gzip/deflate without ever
inflating more than the cap (a compression bomb stops at ``cap + 1`` bytes)."""

from __future__ import annotations

import time
import zlib

import httpx

from fetchpool.engine.phases import PhaseRecorder
from fetchpool.errors import ErrorKind, FetchFailed

#: What the shared client asks for: the encodings decoded here, within the cap.
ACCEPT_ENCODING = "gzip, deflate"
_DECODED = frozenset({"gzip", "x-gzip", "deflate"})


def content_encoding(response: httpx.Response) -> str:
    """The response's Content-Encoding, lower-cased ("" when none)."""
    return response.headers.get("content-encoding", "").strip().lower()


def decodes(response: httpx.Response) -> bool:
    """Whether :func:`read_body` decodes this response's body (gzip, deflate); the headers
    Content-Encoding and Content-Length stay as the server sent them."""
    return content_encoding(response) in _DECODED


class _Inflater:
    """zlib decompression with an output bound per call (``max_length``)."""

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        # gzip: header required; deflate: RFC 9110 says zlib, but raw deflate is common.
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS)
        self._started = False

    def feed(self, data: bytes, room: int) -> bytes:
        """Up to ``room`` decoded bytes of ``data``; raises TOO_LARGE if there are more."""
        try:
            out = self._inflate.decompress(data, room + 1)
        except zlib.error:
            if self._encoding != "deflate" or self._started:
                raise
            self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
            out = self._inflate.decompress(data, room + 1)
        self._started = True
        if len(out) > room or self._inflate.unconsumed_tail:
            raise FetchFailed(ErrorKind.TOO_LARGE, "decompressed body exceeds the limit")
        return out


async def read_body(response: httpx.Response, cap: int, recorder: PhaseRecorder) -> bytes:
    """The response body, decoded for gzip/deflate (other encodings are returned as sent).

    Raises FetchFailed(TOO_LARGE) as soon as more than ``cap`` bytes (decoded) arrive,
    and FetchFailed(PROTOCOL) for a body that does not decompress.
    """
    encoding = content_encoding(response)
    inflater = _Inflater(encoding) if encoding in _DECODED else None
    declared = response.headers.get("content-length", "")
    if inflater is None and declared.isdigit() and int(declared) > cap:
        raise FetchFailed(ErrorKind.TOO_LARGE, f"body of {declared} bytes exceeds the limit of {cap} bytes")
    start = time.monotonic()
    chunks: list[bytes] = []
    size = 0
    try:
        async for raw in response.aiter_raw():
            chunk = inflater.feed(raw, cap - size) if inflater is not None else raw
            size += len(chunk)
            if size > cap:
                raise FetchFailed(ErrorKind.TOO_LARGE, f"body exceeds the limit of {cap} bytes")
            chunks.append(chunk)
    except zlib.error as exc:
        raise FetchFailed(ErrorKind.PROTOCOL, f"{encoding} body does not decompress: {exc}") from None
    recorder.add("response.body", start, time.monotonic(), size=size)
    return b"".join(chunks)
