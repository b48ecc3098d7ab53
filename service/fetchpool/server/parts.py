"""Results that do not fit one gRPC message: parts in the streaming RPCs, a TOO_LARGE error in Fetch.

A gRPC client refuses messages over its max receive message size, 4 MiB unless configured, and
refusing one ends the whole call (every other result of a batch is lost with it). So no result
message exceeds what the caller accepts: ``FetchRequest.max_message_bytes`` (4 MiB when 0), at
most the server's ``--max-message-bytes``.

In FetchMany and FetchStream a larger result goes as consecutive messages with its ``index``
(in their packed forms, as consecutive entries of FetchResults messages, :func:`pack`):
part 0 carries every field and the first bytes of ``body``; parts 1, 2, ... carry ``id``,
``index``, ``part``, ``more_parts`` and the next bytes of ``body`` and then of ``text``; the last
has ``more_parts`` false. Callers concatenate ``body`` and ``text`` until then
(``fetchpool.client.reassemble`` does it). Unary Fetch cannot send parts: such a result comes
without body and text, with a TOO_LARGE error that names the remedies.
"""

from __future__ import annotations

from collections.abc import Iterable

from fetchpool.v1 import fetch_pb2 as pb

__all__ = ["DEFAULT_MESSAGE_BYTES", "MIN_MESSAGE_BYTES", "message_limit", "pack", "split", "too_large_for_fetch"]

#: gRPC's default max receive message size (every stock client's).
DEFAULT_MESSAGE_BYTES = 4 * 1024 * 1024
#: Smaller asks are raised to this: part 0 must hold the status, the headers and some body.
MIN_MESSAGE_BYTES = 256 * 1024
# Bytes a part spends besides its body and text bytes: the tags and length prefixes of body and
# text (up to 8 bytes), of part and more_parts (up to 9), rounded up.
_FRAMING = 32
# What a result costs in FetchResults besides its own bytes: its tag and length prefix.
_ENTRY = 6
#: A result whose body and text take at most this many bytes is measured exactly (``ByteSize``:
#: 1 µs for a 2 KiB page, where reading back every field for the bound takes 5 µs).
_SMALL = 16 * 1024


def message_limit(asked: int, ceiling: int) -> int:
    """The largest result message for a caller that asked for ``asked`` bytes (0: gRPC's
    default), within ``MIN_MESSAGE_BYTES`` and the server's ``ceiling``."""
    return min(max(asked or DEFAULT_MESSAGE_BYTES, MIN_MESSAGE_BYTES), max(ceiling, MIN_MESSAGE_BYTES))


def _cut(text: bytes, end: int) -> int:
    """``end`` moved back to the start of a UTF-8 character (never inside one)."""
    while 0 < end < len(text) and text[end] & 0xC0 == 0x80:
        end -= 1
    return end


def _small(result: pb.FetchResult) -> bool:
    """Whether ``result`` is measured exactly (see ``_SMALL``)."""
    return result.body_size + 4 * len(result.text) <= _SMALL


def _surely_fits(result: pb.FetchResult, limit: int) -> bool:
    """Whether ``result`` fits ``limit`` bytes by :func:`_size_bound`."""
    return _size_bound(result) <= limit


def _size_bound(result: pb.FetchResult) -> int:
    """A cheap upper bound of ``result``'s size in bytes: ``ByteSize()`` serializes the whole
    message (300 µs for a 1 MiB body here), this reads only lengths. Strings count 4 bytes a
    character (UTF-8's most), every field 16 bytes of framing."""
    strings = (result.id, result.url, result.final_url, result.http_version, result.pool, result.encoding,
               result.remote_address, result.tls_version, result.error.message, result.text)
    size = result.body_size + sum(4 * len(text) + 16 for text in strings) + 256  # 256: the numbers, timings
    size += sum(4 * (len(h.name) + len(h.value)) + 32 for h in result.headers)
    size += sum(4 * len(r.url) + 32 for r in result.redirects)
    return size


def split(result: pb.FetchResult, limit: int) -> list[pb.FetchResult]:
    """``result`` as messages of at most ``limit`` bytes each (itself when it fits). Modifies ``result``.

    ``result.body_size`` must be the length of its body (``result_to_proto`` sets it).
    """
    if _small(result):
        if result.ByteSize() <= limit:
            return [result]
    elif _surely_fits(result, limit) or result.ByteSize() <= limit:
        return [result]
    body, text = result.body, result.text.encode("utf-8")
    result.ClearField("body")
    result.ClearField("text")
    parts: list[pb.FetchResult] = []
    message, body_at, text_at = result, 0, 0
    while True:
        room = max(limit - message.ByteSize() - _FRAMING, 0)
        message.body = body[body_at:body_at + room]
        body_at += len(message.body)
        room -= len(message.body)
        if body_at == len(body) and room:
            end = _cut(text, min(text_at + room, len(text)))
            message.text = text[text_at:end].decode("utf-8")
            text_at = end
        parts.append(message)
        if body_at == len(body) and text_at == len(text):
            break
        message = pb.FetchResult(id=result.id, index=result.index, part=len(parts))
    for part in parts[:-1]:
        part.more_parts = True
    return parts


def pack(results: Iterable[tuple[pb.FetchResult, int]]) -> list[pb.FetchResults]:
    """``results``, each with its caller's message limit in bytes (:func:`message_limit`), as
    FetchResults messages in the same order, each within the smallest limit of the results it
    carries. A result that does not fit one message alone goes in parts (:func:`split`), still
    consecutive. Modifies the results."""
    messages: list[pb.FetchResults] = []
    batch: list[pb.FetchResult] = []
    size = limit = 0
    for result, result_limit in results:
        for part, cost in _costed(result, result_limit):
            if batch and size + cost > min(limit, result_limit):
                messages.append(pb.FetchResults(results=batch))
                batch, size = [], 0
            limit = min(limit, result_limit) if batch else result_limit
            batch.append(part)
            size += cost
    if batch:
        messages.append(pb.FetchResults(results=batch))
    return messages


def _costed(result: pb.FetchResult, limit: int) -> list[tuple[pb.FetchResult, int]]:
    """``result`` as (message, bytes it takes in a FetchResults) within ``limit``: itself when it
    fits, measured once (exactly when small, else by the bound); else its parts (:func:`split`),
    each counted as filling a message of its own."""
    size = result.ByteSize() if _small(result) else _size_bound(result)
    if size <= limit - _ENTRY:
        return [(result, size + _ENTRY)]
    return [(part, limit) for part in split(result, limit - _ENTRY)]


def too_large_for_fetch(result: pb.FetchResult, limit: int) -> pb.FetchResult:
    """``result`` as unary Fetch may send it: itself when it fits ``limit`` bytes, else without
    body and text and with a TOO_LARGE error (status, headers, ``body_size`` kept)."""
    if _surely_fits(result, limit):
        return result
    size = result.ByteSize()
    if size <= limit:
        return result
    result.ClearField("body")
    result.ClearField("text")
    result.error.kind = pb.FetchError.TOO_LARGE
    result.error.message = (
        f"the result ({size} bytes, body {result.body_size} bytes) exceeds one message of at most {limit} bytes: "
        "use FetchMany or FetchStream, which send large bodies in parts, or set max_message_bytes on the "
        "request and raise your client's max receive message size to match"
    )
    return result
