"""A small ASGI app for what a static nginx site cannot do: delays, chosen statuses, redirects,
flaky endpoints, echo. Served by hypercorn in its own process (see servers.AppServer).

Endpoints (all GET-able; /echo takes any method):
  /delay?s=0.5                 sleep s seconds (at most 300), then 200 "delayed <s>"
  /status/{code}?retry_after=N status code (200-599), with Retry-After: N when given
  /bytes?n=N                   N bytes of expected_bytes(N), Content-Length set, streamed in 64 KiB
  /echo                        JSON: method, path, query, http_version, scheme,
                               headers as [name, value] pairs (duplicates kept), body_b64
  /redirect/{n}                302 to /redirect/{n-1}; /redirect/0 answers 200 "done"
  /redirect-loop               302 to itself, forever
  /redirect-to?to=URL          302 to URL (any origin)
  /flaky?key=K&fail=N          503 (or ?status=) for the first N requests with key K, then 200;
                               X-Attempt: count; ?retry_after=V adds Retry-After: V to the failures
  /headers-big?n=N             200 with about N bytes of response headers (x-big-NNNN, 1000 B each)
  /barrier?key=K&n=N&s=T       waits until N requests with key K are in flight at once, then all
                               answer 200 "together N"; after T seconds (default 5) without that,
                               504 "only M of N at once" (M: the most that were)
  /gzip?n=N                    expected_bytes(N), gzip-encoded (Content-Encoding: gzip, Content-Length)
  /set-cookie?name=K&value=V   200 with Set-Cookie: K=V; Path=/ (and ?max_age=S: Max-Age=S)
  /text?lang=L&enc=E&declare=D a page of SAMPLE_TEXTS[L] (fr, de, ru, ja, zh) encoded in E, its charset
                               declared by D: header, meta, http-equiv, or none (the default)
Anything else: 404. Bad parameters: 400.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_PATTERN = bytes(range(256))
_CHUNK = 64 * 1024  # a multiple of len(_PATTERN), so every chunk starts the pattern afresh
_MAX_DELAY_S = 300.0
_MAX_REDIRECTS = 1000
_HEADER_VALUE_LEN = 1000
_MAX_HEADER_BYTES = 1024 * 1024

#: Sample text per language for /text: long enough for a detector, real words, no ASCII-only page.
SAMPLE_TEXTS = {
    "fr": "Les élèves étaient très contents de découvrir la forêt près du château. « Où est le garçon ? » "
          "demanda-t-elle, il était déjà parti à l'école. Prix : 12 € seulement, déjà payé, reçu à côté.",
    "de": "Grüße aus München! Die Straße ist schön, und das Wetter ist heiß. Größere Häuser kosten mehr, "
          "überall blühen Bäume, und die Brücke über den Fluss ist längst fertig.",
    "ru": "Привет, мир! Это тестовая страница на русском языке для проверки кодировки. Мы читаем текст, "
          "который сервер отправляет без объявления кодировки, и определяем её сами.",
    "ja": "こんにちは世界、これは日本語のテキストです。文字コードの判定を試験しています。"
          "サーバーは文字コードを宣言せずにこのページを送ります。",
    "zh": "你好世界，这是中文文本。我们正在测试编码检测。服务器发送这个页面时没有声明编码，我们自己判断。",  # noqa: RUF001
}

# Requests seen per /flaky key; lives as long as the server process.
_flaky_counts: dict[str, int] = {}


class _Barrier:
    """Requests of one /barrier key: how many are waiting now (and at most), and the event that
    lets them all go once there were enough at once."""

    def __init__(self) -> None:
        self.waiting = 0
        self.peak = 0
        self.met = asyncio.Event()


# Open barriers by key; a key's entry goes when its last request leaves.
_barriers: dict[str, _Barrier] = {}


class BadRequest(ValueError):
    """A request parameter is missing or out of range; answered with 400."""


def expected_bytes(n: int) -> bytes:
    """The body that /bytes?n=``n`` returns: bytes 0..255 repeated, cut to ``n``."""
    return (_PATTERN * (n // len(_PATTERN) + 1))[:n]


def _param(query: dict[str, list[str]], name: str, default: str | None = None) -> str:
    values = query.get(name)
    if values:
        return values[0]
    if default is None:
        raise BadRequest(f"missing query parameter {name!r}")
    return default


def _float(text: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"not a number: {text!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{value} not in [{low}, {high}]")
    return value


def _int(text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"not an integer: {text!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{value} not in [{low}, {high}]")
    return value


async def _respond(send: Send, status: int, body: bytes = b"", headers: Headers | None = None) -> None:
    all_headers = [(b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:  # ends with the last body message (more_body False) or the client leaving
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


async def _bytes(send: Send, n: int) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(n).encode()), (b"content-type", b"application/octet-stream")],
        }
    )
    chunk = expected_bytes(_CHUNK)
    for offset in range(0, n, _CHUNK):
        size = min(_CHUNK, n - offset)
        await send({"type": "http.response.body", "body": chunk[:size], "more_body": offset + size < n})
    if n == 0:
        await send({"type": "http.response.body", "body": b""})


async def _text(send: Send, lang: str, encoding: str, declare: str) -> None:
    if lang not in SAMPLE_TEXTS or declare not in ("header", "meta", "http-equiv", "none"):
        raise BadRequest(f"unknown lang {lang!r} or declare {declare!r}")
    meta = {"meta": f'<meta charset="{encoding}">',
            "http-equiv": f'<meta http-equiv="Content-Type" content="text/html; charset={encoding}">'}.get(declare, "")
    page = (f"<!DOCTYPE html><html><head>{meta}<title>{lang}</title></head>"
            f"<body><p>{SAMPLE_TEXTS[lang]}</p></body></html>")
    content_type = f"text/html; charset={encoding}" if declare == "header" else "text/html"
    try:
        body = page.encode(encoding)
    except (LookupError, UnicodeEncodeError):
        raise BadRequest(f"cannot encode {lang} in {encoding!r}") from None
    await _respond(send, 200, body, [(b"content-type", content_type.encode())])


async def _echo(scope: Scope, receive: Receive, send: Send) -> None:
    body = await _read_body(receive)
    payload = {
        "method": scope["method"],
        "path": scope["path"],
        "query": scope["query_string"].decode("latin-1"),
        "http_version": scope["http_version"],
        "scheme": scope["scheme"],
        "headers": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in scope["headers"]],
        "body_b64": base64.b64encode(body).decode("ascii"),
    }
    await _respond(send, 200, json.dumps(payload).encode(), [(b"content-type", b"application/json")])


async def _route(scope: Scope, receive: Receive, send: Send) -> None:
    path: str = scope["path"]
    query = parse_qs(scope["query_string"].decode("latin-1"))
    if path == "/echo":
        await _echo(scope, receive, send)
    elif path == "/delay":
        seconds = _float(_param(query, "s", "0.5"), 0.0, _MAX_DELAY_S)
        await asyncio.sleep(seconds)
        await _respond(send, 200, f"delayed {seconds}".encode())
    elif path.startswith("/status/"):
        code = _int(path.removeprefix("/status/"), 200, 599)
        headers: Headers = []
        if "retry_after" in query:
            headers.append((b"retry-after", _param(query, "retry_after").encode("latin-1")))
        # 204 and 304 must not carry a body.
        await _respond(send, code, b"" if code in (204, 304) else f"status {code}".encode(), headers)
    elif path == "/bytes":
        await _bytes(send, _int(_param(query, "n"), 0, 1 << 40))
    elif path.startswith("/redirect/"):
        hops = _int(path.removeprefix("/redirect/"), 0, _MAX_REDIRECTS)
        if hops == 0:
            await _respond(send, 200, b"done")
        else:
            await _respond(send, 302, b"", [(b"location", f"/redirect/{hops - 1}".encode())])
    elif path == "/redirect-to":
        await _respond(send, 302, b"", [(b"location", _param(query, "to").encode("latin-1"))])
    elif path == "/redirect-loop":
        await _respond(send, 302, b"", [(b"location", b"/redirect-loop")])
    elif path == "/flaky":
        key = _param(query, "key")
        fail = _int(_param(query, "fail", "1"), 0, 1_000_000)
        code = _int(_param(query, "status", "503"), 400, 599)
        _flaky_counts[key] = attempt = _flaky_counts.get(key, 0) + 1
        headers = [(b"x-attempt", str(attempt).encode())]
        if attempt <= fail and "retry_after" in query:
            headers.append((b"retry-after", _param(query, "retry_after").encode()))
        await _respond(send, code if attempt <= fail else 200, f"attempt {attempt}".encode(), headers)
    elif path == "/gzip":
        body = gzip.compress(expected_bytes(_int(_param(query, "n"), 0, 1 << 26)))
        await _respond(send, 200, body, [(b"content-encoding", b"gzip")])
    elif path == "/set-cookie":
        cookie = f"{_param(query, 'name')}={_param(query, 'value')}; Path=/"
        if "max_age" in query:
            cookie += f"; Max-Age={_int(_param(query, 'max_age'), 0, 1 << 31)}"
        await _respond(send, 200, b"cookie set", [(b"set-cookie", cookie.encode("latin-1"))])
    elif path == "/text":
        await _text(send, _param(query, "lang", "fr"), _param(query, "enc", "utf-8"), _param(query, "declare", "none"))
    elif path == "/headers-big":
        total = _int(_param(query, "n"), 0, _MAX_HEADER_BYTES)
        count = -(-total // _HEADER_VALUE_LEN)
        big = [(f"x-big-{i:04d}".encode(), b"h" * _HEADER_VALUE_LEN) for i in range(count)]
        await _respond(send, 200, b"big headers", big)
    elif path == "/barrier":
        count = _int(_param(query, "n"), 1, 100_000)
        await _barrier(send, _param(query, "key"), count, _float(_param(query, "s", "5"), 0.0, _MAX_DELAY_S))
    else:
        await _respond(send, 404, b"not found")


async def _barrier(send: Send, key: str, count: int, seconds: float) -> None:
    barrier = _barriers.setdefault(key, _Barrier())
    barrier.waiting += 1
    barrier.peak = max(barrier.peak, barrier.waiting)
    if barrier.waiting >= count:
        barrier.met.set()
    try:
        await asyncio.wait_for(barrier.met.wait(), seconds)
    except TimeoutError:
        await _respond(send, 504, f"only {barrier.peak} of {count} at once".encode())
    else:
        await _respond(send, 200, f"together {count}".encode())
    finally:
        barrier.waiting -= 1
        if not barrier.waiting:
            _barriers.pop(key, None)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:  # ends at the server's shutdown message
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI entry point."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    try:
        await _route(scope, receive, send)
    except BadRequest as exc:
        await _respond(send, 400, str(exc).encode())
