"""Hostile and broken servers of the hardening tests, on loopback only.

All of them run in one background thread with its own asyncio loop (``HostileServers``), so
they outlive the per-test event loops and keep answering while a test blocks. Every loop in
here is bounded in count and in time: a misbehaving server never runs longer than
``MAX_MISBEHAVIOUR_S`` nor sends more than ``MAX_SEND_BYTES``.

Servers (``HostileServers`` attributes):
  http      HTTP/1.1 over plain TCP on 127.0.0.1, 127.0.0.2 and ::1 (same port); behaviour by path
  tls       {"good", "self_signed", "expired", "wrong_host", "untrusted", "localhost_only"}:
            the same HTTP/1.1 handler behind TLS (ALPN http/1.1) with that certificate
  h2        HTTP/2 over TLS (ALPN h2, certificate from the tests' CA), written with ``h2``; one
            listener per path (H2_PATHS), so cases never share a connection; and one more,
            ``h2_self_signed_port``, with a self-signed certificate
  tls_eof   accepts a TCP connection and closes it at once (a TLS handshake that hits EOF)
  proxy     a CONNECT proxy (``proxy_url``) that fails as PROXY_FAULTS say, chosen by the target
            port (``through_proxy(fault)``), and tunnels to the servers above otherwise
  blackhole a listening socket that never accepts: TCP connects, nothing ever answers
  refused   a port nothing listens on

HTTP/1.1 paths (query ``k`` names a record, see ``Recorder``):
  /ok /hold?s=&g= /record /zeros?n=       well-behaved (``g`` groups a concurrency gauge)
  /drip-status /drip-headers /drip-body    one byte every ``i`` seconds (default 1)
  /silent                                  reads the request, never answers
  /continue-flood                          "100 Continue" responses forever
  /reset-mid-body /close-mid-body          Content-Length 100000, 10000 bytes, then RST / FIN
  /reset-before-response /close-before-response
  /garbage-status /garbage-status-long /bad-header-line /bad-content-length /conflicting-content-length /bad-chunk
  /headers-big?n=BYTES /headers-many?n=COUNT /headers-endless
  /body-endless (chunked) /body-endless-close (close-delimited) /body-declared-huge
  /gzip-bomb /deflate-bomb /gzip-garbage /gzip-ok
  /redirect-self, /redirect-a <-> /redirect-b, /redirect-inf?n=, /redirect-to?to=URL, /redirect-no-location,
  /redirect-bad-location
HTTP/2 paths: /ok /silent /headers-then-silence /rst-immediately /rst-mid-body /goaway-error
  /goaway-mid-body /goaway-graceful?k= (GOAWAY NO_ERROR on a key's first request, then 200)
  /headers-many?n= /headers-huge?n= /bad-content-length /no-status /data-on-stream-0 /data-endless
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import functools
import gzip
import ipaddress
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
from support import Certs, free_port

#: No misbehaviour lasts longer than this, nor sends more than MAX_SEND_BYTES.
MAX_MISBEHAVIOUR_S = 90.0
MAX_SEND_BYTES = 256 * 1024 * 1024
#: Requests served on one keep-alive connection at most.
MAX_REQUESTS_PER_CONNECTION = 10_000
#: Size of the decompressed zeros in /gzip-bomb and /deflate-bomb.
BOMB_BYTES = 256 * 1024 * 1024
#: Bytes of request head and body read at most.
MAX_REQUEST_BYTES = 4 * 1024 * 1024
GZIP_OK_BODY = b"fetchpool decodes gzip " * 100

HOSTS = ("127.0.0.1", "127.0.0.2", "::1")


# ---------------------------------------------------------------------------------------------
# Observations


@dataclasses.dataclass
class Record:
    """What one key's requests did on the server side."""

    requests: int = 0
    bytes_sent: int = 0
    #: monotonic time the client went away (EOF, reset, RST_STREAM), None while connected
    closed_at: float | None = None
    #: monotonic time the server stopped misbehaving by itself (its bound ran out)
    gave_up_at: float | None = None
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)


class Recorder:
    """Thread-safe records per key, and concurrency gauges per group."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, Record] = {}
        self._active: dict[str, int] = {}
        self._peak: dict[str, int] = {}

    def get(self, key: str) -> Record:
        with self._lock:
            return self._records.setdefault(key, Record())

    def snapshot(self, key: str) -> Record:
        with self._lock:
            return dataclasses.replace(self._records.get(key) or Record())

    def request(self, key: str, headers: list[tuple[str, str]]) -> Record:
        with self._lock:
            record = self._records.setdefault(key, Record())
            record.requests += 1
            record.headers = headers
            record.closed_at = None
            return record

    def sent(self, record: Record, count: int) -> None:
        with self._lock:
            record.bytes_sent += count

    def closed(self, record: Record) -> None:
        with self._lock:
            if record.closed_at is None:
                record.closed_at = time.monotonic()

    def enter(self, group: str) -> None:
        with self._lock:
            self._active[group] = self._active.get(group, 0) + 1
            self._peak[group] = max(self._peak.get(group, 0), self._active[group])

    def leave(self, group: str) -> None:
        with self._lock:
            self._active[group] -= 1

    def peak(self, group: str) -> int:
        with self._lock:
            return self._peak.get(group, 0)

    def active(self, group: str) -> int:
        with self._lock:
            return self._active.get(group, 0)

    def wait_closed(self, key: str, timeout: float) -> Record:
        """Poll (bounded) until the client went away from ``key``'s connection; returns the record."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.snapshot(key)
            if record.closed_at is not None or time.monotonic() > deadline:
                return record
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Certificates and bombs


def self_signed(directory: Path, identities: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[Path, Path]:
    """A self-signed leaf (its own issuer, in no trust store) for ``identities``; (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fetchpool self-signed")])
    sans: list[x509.GeneralName] = []
    for identity in identities:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(identity)))
        except ValueError:
            sans.append(x509.DNSName(identity))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "self-signed.pem", directory / "self-signed.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@functools.cache
def bomb(wbits: int) -> bytes:
    """BOMB_BYTES zeros compressed: wbits 31 = gzip, 15 = zlib ("deflate" in HTTP)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block = bytes(1024 * 1024)
    parts = [compressor.compress(block) for _ in range(BOMB_BYTES // len(block))]
    parts.append(compressor.flush())
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# HTTP/1.1


class Gone(Exception):
    """The client went away."""


@dataclasses.dataclass
class Exchange:
    """One HTTP/1.1 request on a connection, and the means to answer it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    method: str
    path: str
    query: dict[str, list[str]]
    record: Record
    recorder: Recorder
    base: str  # scheme://host:port of this listener, for absolute redirects

    def arg(self, name: str, default: str) -> str:
        values = self.query.get(name)
        return values[0] if values else default

    async def send(self, data: bytes) -> None:
        if self.writer.is_closing():
            self.recorder.closed(self.record)
            raise Gone
        self.writer.write(data)
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            self.recorder.closed(self.record)
            raise Gone from exc
        self.recorder.sent(self.record, len(data))

    async def respond(self, status: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None) -> None:
        head = [f"HTTP/1.1 {status} Hostile\r\n", f"Content-Length: {len(body)}\r\n"]
        head += [f"{name}: {value}\r\n" for name, value in headers or []]
        payload = ("".join(head) + "\r\n").encode("latin-1")
        await self.send(payload if self.method == "HEAD" else payload + body)

    def watch(self) -> asyncio.Task[None]:
        """Mark the record closed when the client hangs up (reads and discards what it sends)."""

        async def watching() -> None:
            try:
                while await self.reader.read(65536):  # bounded by the connection's lifetime
                    pass
            except (ConnectionError, OSError):
                pass
            self.recorder.closed(self.record)

        return asyncio.ensure_future(watching())

    async def drip(self, data: bytes, interval: float) -> None:
        """Send ``data`` one byte every ``interval`` seconds (bounded by MAX_MISBEHAVIOUR_S)."""
        deadline = time.monotonic() + MAX_MISBEHAVIOUR_S
        watcher = self.watch()
        try:
            for i in range(len(data)):
                if time.monotonic() > deadline or watcher.done():
                    return
                await self.send(data[i : i + 1])
                await asyncio.sleep(interval)
            self.record.gave_up_at = time.monotonic()
        finally:
            watcher.cancel()

    async def hold_until_gone(self) -> None:
        """Answer nothing; return when the client hangs up or MAX_MISBEHAVIOUR_S passed."""
        watcher = self.watch()
        try:
            await asyncio.wait_for(asyncio.shield(watcher), MAX_MISBEHAVIOUR_S)
        except TimeoutError:
            self.record.gave_up_at = time.monotonic()
        finally:
            watcher.cancel()

    async def stream(self, chunk: bytes, framing: Callable[[bytes], bytes]) -> None:
        """Send ``framing(chunk)`` until the client goes away or the bounds run out."""
        deadline = time.monotonic() + MAX_MISBEHAVIOUR_S
        watcher = self.watch()
        try:
            sent = 0
            while sent < MAX_SEND_BYTES and time.monotonic() < deadline and not watcher.done():
                await self.send(framing(chunk))
                sent += len(chunk)
            if not watcher.done():  # the bounds ran out before the client went away
                self.record.gave_up_at = time.monotonic()
        finally:
            watcher.cancel()

    def reset(self) -> None:
        """Abort the connection with a TCP RST."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Behaviour = Callable[[Exchange], Awaitable[bool]]  # returns whether the connection may serve more


async def _ok(x: Exchange) -> bool:
    await x.respond(200, b"ok")
    return True


async def _zeros(x: Exchange) -> bool:
    await x.respond(200, bytes(min(int(x.arg("n", "1024")), 64 * 1024 * 1024)))
    return True


async def _hold(x: Exchange) -> bool:
    group = x.arg("g", "default")
    x.recorder.enter(group)
    try:
        await asyncio.sleep(min(float(x.arg("s", "1")), MAX_MISBEHAVIOUR_S))
    finally:
        x.recorder.leave(group)
    await x.respond(200, b"held")
    return True


async def _drip_status(x: Exchange) -> bool:
    await x.drip(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + b" " * 200, float(x.arg("i", "1")))
    return False


async def _drip_headers(x: Exchange) -> bool:
    await x.send(b"HTTP/1.1 200 OK\r\nX-Drip: ")
    await x.drip(b"a" * 200, float(x.arg("i", "1")))
    return False


async def _drip_body(x: Exchange) -> bool:
    await x.send(b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n")
    await x.drip(b"b" * 200, float(x.arg("i", "1")))
    return False


async def _silent(x: Exchange) -> bool:
    await x.hold_until_gone()
    return False


async def _continue_flood(x: Exchange) -> bool:
    deadline = time.monotonic() + MAX_MISBEHAVIOUR_S
    watcher = x.watch()
    try:
        for _ in range(1_000_000):
            if time.monotonic() > deadline or watcher.done():
                break
            await x.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            await asyncio.sleep(0.01)
        if not watcher.done():
            x.record.gave_up_at = time.monotonic()
    finally:
        watcher.cancel()
    return False


async def _cut_mid_body(x: Exchange, rst: bool) -> bool:
    await x.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"c" * 10000)
    await asyncio.sleep(0.05)
    if rst:
        x.reset()
    else:
        x.writer.close()
    return False


async def _cut_before_response(x: Exchange, rst: bool) -> bool:
    if rst:
        x.reset()
    else:
        x.writer.close()
    return False


def _raw(data: bytes) -> Behaviour:
    async def behaviour(x: Exchange) -> bool:
        await x.send(data)
        await asyncio.sleep(0.05)
        return False

    return behaviour


async def _headers_big(x: Exchange) -> bool:
    total = min(int(x.arg("n", "80000")), 16 * 1024 * 1024)
    headers = [(f"X-Big-{i:05d}", "h" * 1000) for i in range(-(-total // 1000))]
    await x.respond(200, b"big headers", headers)
    return True


async def _headers_many(x: Exchange) -> bool:
    count = min(int(x.arg("n", "300")), 100_000)
    await x.respond(200, b"many headers", [(f"X-Many-{i:05d}", "v") for i in range(count)])
    return True


async def _headers_endless(x: Exchange) -> bool:
    await x.send(b"HTTP/1.1 200 OK\r\n")
    counter = iter(range(10**9))
    await x.stream(b"v" * 1000, lambda chunk: b"X-Endless-%d: " % next(counter) + chunk + b"\r\n")
    return False


async def _body_endless(x: Exchange) -> bool:
    await x.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    await x.stream(b"e" * 65536, lambda chunk: b"%x\r\n%s\r\n" % (len(chunk), chunk))
    return False


async def _body_endless_close(x: Exchange) -> bool:
    await x.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    await x.stream(b"e" * 65536, lambda chunk: chunk)
    return False


async def _body_declared_huge(x: Exchange) -> bool:
    await x.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n")
    await x.drip(b"d" * 200, 1.0)
    return False


def _compressed(encoding: str, wbits: int) -> Behaviour:
    async def behaviour(x: Exchange) -> bool:
        body = await asyncio.get_running_loop().run_in_executor(None, bomb, wbits)
        await x.send(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n" % (encoding.encode(), len(body))
        )
        watcher = x.watch()
        try:
            for offset in range(0, len(body), 65536):
                if watcher.done():
                    break
                await x.send(body[offset : offset + 65536])
        finally:
            watcher.cancel()
        return False

    return behaviour


async def _gzip_garbage(x: Exchange) -> bool:
    await x.respond(200, b"this is not gzip at all" * 10, [("Content-Encoding", "gzip")])
    return True


async def _gzip_ok(x: Exchange) -> bool:
    await x.respond(200, gzip.compress(GZIP_OK_BODY), [("Content-Encoding", "gzip")])
    return True


def _redirect(location: Callable[[Exchange], str | None]) -> Behaviour:
    async def behaviour(x: Exchange) -> bool:
        target = location(x)
        await x.respond(302, b"", [] if target is None else [("Location", target)])
        return True

    return behaviour


def _query_k(x: Exchange) -> str:
    return f"k={x.arg('k', '')}"


HTTP1_ROUTES: dict[str, Behaviour] = {
    "/ok": _ok,
    "/record": _ok,
    "/hold": _hold,
    "/zeros": _zeros,
    "/drip-status": _drip_status,
    "/drip-headers": _drip_headers,
    "/drip-body": _drip_body,
    "/silent": _silent,
    "/continue-flood": _continue_flood,
    "/reset-mid-body": functools.partial(_cut_mid_body, rst=True),
    "/close-mid-body": functools.partial(_cut_mid_body, rst=False),
    "/reset-before-response": functools.partial(_cut_before_response, rst=True),
    "/close-before-response": functools.partial(_cut_before_response, rst=False),
    "/garbage-status": _raw(b"\x00\x01\x02 HELLO THERE\r\n\r\n"),
    "/garbage-status-long": _raw(b"NOT HTTP " + b"x" * 4000 + b"\r\n\r\n"),
    "/bad-header-line": _raw(b"HTTP/1.1 200 OK\r\nthis line has no colon\r\nContent-Length: 2\r\n\r\nok"),
    "/bad-content-length": _raw(b"HTTP/1.1 200 OK\r\nContent-Length: twelve\r\n\r\nok"),
    "/conflicting-content-length": _raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!"),
    "/bad-chunk": _raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n0\r\n\r\n"),
    "/headers-big": _headers_big,
    "/headers-many": _headers_many,
    "/headers-endless": _headers_endless,
    "/body-endless": _body_endless,
    "/body-endless-close": _body_endless_close,
    "/body-declared-huge": _body_declared_huge,
    "/gzip-bomb": _compressed("gzip", 31),
    "/deflate-bomb": _compressed("deflate", 15),
    "/gzip-garbage": _gzip_garbage,
    "/gzip-ok": _gzip_ok,
    "/redirect-self": _redirect(lambda x: f"/redirect-self?{_query_k(x)}"),
    "/redirect-a": _redirect(lambda x: f"/redirect-b?{_query_k(x)}"),
    "/redirect-b": _redirect(lambda x: f"/redirect-a?{_query_k(x)}"),
    "/redirect-inf": _redirect(lambda x: f"/redirect-inf?{_query_k(x)}&n={int(x.arg('n', '0')) + 1}"),
    "/redirect-to": _redirect(lambda x: x.arg("to", "/ok")),
    "/redirect-no-location": _redirect(lambda x: None),
    "/redirect-bad-location": _redirect(lambda x: "http://[::1"),
}


async def _read_request_body(reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> None:
    fields = {name.lower(): value for name, value in headers}
    if "chunked" in fields.get("transfer-encoding", "").lower():
        total = 0
        for _ in range(100_000):
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            total += size
            if total > MAX_REQUEST_BYTES:
                raise Gone
            await reader.readexactly(size + 2)
            if size == 0:
                return
        raise Gone
    length = fields.get("content-length", "0").strip()
    if length:
        count = int(length)
        if count > MAX_REQUEST_BYTES:
            raise Gone
        await reader.readexactly(count)


async def serve_http1(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, recorder: Recorder, base: str
) -> None:
    """Serve HTTP/1.1 requests on one connection, by path (see HTTP1_ROUTES)."""
    try:
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            try:
                first = await reader.readexactly(1)
                if first == b"\x16":  # a TLS ClientHello on a plain port: answer 400 as real servers do
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                    return
                head = first + await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                return
            method, target = parts[0], parts[1]
            headers = [tuple(s.strip() for s in line.split(":", 1)) for line in lines[1:] if ":" in line]
            await _read_request_body(reader, headers)  # type: ignore[arg-type]
            url = urlsplit(target)
            query = parse_qs(url.query)
            key = (query.get("k") or [""])[0]
            record = recorder.request(key, headers) if key else Record()  # type: ignore[arg-type]
            exchange = Exchange(reader, writer, method, url.path, query, record, recorder, base)
            behaviour = HTTP1_ROUTES.get(url.path)
            if behaviour is None:
                await exchange.respond(404, b"not found")
                continue
            if not await behaviour(exchange):
                return
    except (Gone, ConnectionError, OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return
    finally:
        if not writer.is_closing():
            writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# ---------------------------------------------------------------------------------------------
# HTTP/2


class H2Connection:
    """One HTTP/2 server connection that misbehaves on purpose, by :path."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, recorder: Recorder) -> None:
        self.reader, self.writer, self.recorder = reader, writer, recorder
        config = h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.window = asyncio.Event()
        self.records: dict[int, Record] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def run(self) -> None:
        self.conn.initiate_connection()
        self.flush()
        try:
            for _ in range(10_000_000):  # bounded: one read per iteration, ends at EOF
                data = await self.reader.read(65536)
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    self.flush()
                    break
                for event in events:
                    self.on_event(event)
                self.flush()
                await self.writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            for record in self.records.values():
                self.recorder.closed(record)
            for task in self.tasks:
                task.cancel()
            self.window.set()
            if not self.writer.is_closing():
                self.writer.close()

    def on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            headers = [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in event.headers]
            task = asyncio.ensure_future(self.handle(event.stream_id, headers))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            self.window.set()
        elif isinstance(event, h2.events.StreamReset):
            record = self.records.get(event.stream_id)
            if record is not None:
                self.recorder.closed(record)
            self.window.set()

    async def send_now(self) -> None:
        self.flush()
        await self.writer.drain()

    async def handle(self, stream_id: int, headers: list[tuple[str, str]]) -> None:
        fields = dict(headers)
        url = urlsplit(fields.get(":path", "/"))
        query = parse_qs(url.query)
        key = (query.get("k") or [""])[0]
        record = self.recorder.request(key, headers) if key else Record()
        self.records[stream_id] = record
        conn = self.conn
        path = url.path
        try:
            if path == "/ok":
                conn.send_headers(stream_id, [(":status", "200"), ("content-length", "2")])
                conn.send_data(stream_id, b"ok", end_stream=True)
            elif path == "/silent":
                return
            elif path == "/headers-then-silence":
                conn.send_headers(stream_id, [(":status", "200"), ("content-length", "100")])
            elif path == "/rst-immediately":
                conn.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            elif path == "/rst-mid-body":
                conn.send_headers(stream_id, [(":status", "200"), ("content-length", "100000")])
                conn.send_data(stream_id, b"r" * 1000)
                await self.send_now()
                await asyncio.sleep(0.05)
                conn.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            elif path == "/goaway-error":
                conn.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR, last_stream_id=0)
                await self.send_now()
                self.writer.close()
            elif path == "/goaway-mid-body":
                conn.send_headers(stream_id, [(":status", "200"), ("content-length", "100000")])
                conn.send_data(stream_id, b"g" * 1000)
                await self.send_now()
                await asyncio.sleep(0.05)
                conn.close_connection(h2.errors.ErrorCodes.INTERNAL_ERROR, last_stream_id=stream_id)
                await self.send_now()
                self.writer.close()
            elif path == "/goaway-graceful":
                if record.requests <= 1:
                    conn.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=0)
                    await self.send_now()
                    self.writer.close()
                else:
                    conn.send_headers(stream_id, [(":status", "200"), ("content-length", "2")])
                    conn.send_data(stream_id, b"ok", end_stream=True)
            elif path == "/headers-many":
                count = min(int((query.get("n") or ["300"])[0]), 100_000)
                many = [(f"x-many-{i:05d}", "v") for i in range(count)]
                conn.send_headers(stream_id, [(":status", "200"), ("content-length", "2"), *many])
                conn.send_data(stream_id, b"ok", end_stream=True)
            elif path == "/headers-huge":
                total = min(int((query.get("n") or ["200000"])[0]), 16 * 1024 * 1024)
                big = [(f"x-huge-{i:05d}", "h" * 1000) for i in range(-(-total // 1000))]
                conn.send_headers(stream_id, [(":status", "200"), ("content-length", "2"), *big])
                conn.send_data(stream_id, b"ok", end_stream=True)
            elif path == "/bad-content-length":
                conn.send_headers(stream_id, [(":status", "200"), ("content-length", "10")])
                conn.send_data(stream_id, b"x" * 20, end_stream=True)
            elif path == "/no-status":
                conn.send_headers(stream_id, [("content-length", "2")])
                conn.send_data(stream_id, b"ok", end_stream=True)
            elif path == "/data-on-stream-0":
                conn.send_headers(stream_id, [(":status", "200"), ("content-length", "100")])
                await self.send_now()
                # A DATA frame on stream 0: length 1, type 0, flags 0, stream 0, payload "x".
                self.writer.write(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
            elif path == "/data-endless":
                await self.data_endless(stream_id, record)
            else:
                conn.send_headers(stream_id, [(":status", "404"), ("content-length", "0")], end_stream=True)
            await self.send_now()
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError, ConnectionError, OSError):
            pass

    async def data_endless(self, stream_id: int, record: Record) -> None:
        self.conn.send_headers(stream_id, [(":status", "200")])
        deadline = time.monotonic() + MAX_MISBEHAVIOUR_S
        chunk = b"e" * 16384
        sent = 0
        while sent < MAX_SEND_BYTES and time.monotonic() < deadline and not self.closed:
            if record.closed_at is not None:
                return
            room = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if room <= 0:
                self.window.clear()
                await self.send_now()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.window.wait(), 1.0)
                continue
            self.conn.send_data(stream_id, chunk[:room])
            sent += room
            self.recorder.sent(record, room)
            await self.send_now()
        if not self.closed and record.closed_at is None:  # the bounds ran out first
            record.gave_up_at = time.monotonic()


# ---------------------------------------------------------------------------------------------
# A forward proxy that fails CONNECT in chosen ways


#: CONNECT misbehaviours; each is chosen by a CONNECT target port of its own (never listened on).
PROXY_FAULTS = (
    "close-after-200", "reset-after-200", "reset-before-reply", "bad-gateway", "auth-required", "silent",
    "garbage-reply",
)


async def serve_proxy(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, faults: dict[int, str], tunnel_ports: set[int]
) -> None:
    """One CONNECT: misbehave as ``faults[port]`` says, or tunnel to 127.0.0.1:port for ``tunnel_ports``."""

    def reset() -> None:
        sock = writer.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    try:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        host, _, port_text = target.rpartition(":")
        port = int(port_text) if port_text.isdigit() else 0
        fault = faults.get(port)
        if method != "CONNECT" or host != "127.0.0.1" or (fault is None and port not in tunnel_ports):
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        elif fault == "close-after-200":
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
        elif fault == "reset-after-200":
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            reset()
        elif fault == "reset-before-reply":
            reset()
        elif fault == "bad-gateway":
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        elif fault == "auth-required":
            writer.write(b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="x"\r\n'
                         b"Content-Length: 0\r\n\r\n")
        elif fault == "silent":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(), MAX_MISBEHAVIOUR_S)  # until the client hangs up
        elif fault == "garbage-reply":
            writer.write(b"\x00\x01 not an HTTP reply\r\n\r\n")
        else:
            await _tunnel(reader, writer, port)
        await writer.drain()
    except (ConnectionError, OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        if not writer.is_closing():
            writer.close()


async def _tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
    upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await source.read(65536):  # ends at EOF
                sink.write(data)
                await sink.drain()
        with contextlib.suppress(Exception):
            sink.close()

    try:
        await asyncio.wait_for(
            asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer)), MAX_MISBEHAVIOUR_S
        )
    finally:
        upstream_writer.close()


H2_PATHS = (
    "/ok", "/silent", "/headers-then-silence", "/rst-immediately", "/rst-mid-body", "/goaway-error",
    "/goaway-mid-body", "/goaway-graceful", "/headers-many", "/headers-huge", "/bad-content-length",
    "/no-status", "/data-on-stream-0", "/data-endless",
)


# ---------------------------------------------------------------------------------------------
# The servers


class HostileServers:
    """Every hostile server, in one background thread; ``close()`` stops them all."""

    def __init__(self, certs: Certs, workdir: Path) -> None:
        self.certs = certs
        self.recorder = Recorder()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="hostile-servers", daemon=True)
        self._servers: list[asyncio.base_events.Server] = []
        self._connections: set[asyncio.Task[Any]] = set()
        self._blackhole = socket.socket()
        self.http_port = free_port()
        self.h2_ports = {path: free_port() for path in H2_PATHS}
        self.h2_self_signed_port = free_port()
        self.proxy_port = free_port()
        self.proxy_fault_ports = {fault: free_port() for fault in PROXY_FAULTS}
        self.tls_eof_port = free_port()
        self.blackhole_port = free_port()
        self.refused_port = free_port()  # handed out, never bound: connections are refused
        names = ("good", "self_signed", "expired", "wrong_host", "untrusted", "localhost_only")
        self.tls_ports = {name: free_port() for name in names}
        signed = self_signed(workdir)
        self._tls_certs = {
            "good": certs.server,
            "self_signed": signed,
            "expired": certs.expired(),
            "wrong_host": certs.wrong_host(),
            "untrusted": certs.untrusted(),
            "localhost_only": certs.issue("localhost-only", "localhost"),
        }

    # URLs -------------------------------------------------------------------------------------

    def http(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{_netloc(host, self.http_port)}{path}"

    def tls(self, kind: str, path: str = "/ok", host: str = "127.0.0.1") -> str:
        return f"https://{_netloc(host, self.tls_ports[kind])}{path}"

    @property
    def proxy_url(self) -> str:
        """The CONNECT proxy: see PROXY_FAULTS and ``through_proxy``."""
        return f"http://127.0.0.1:{self.proxy_port}"

    def through_proxy(self, fault: str) -> str:
        """An https URL whose CONNECT through ``proxy_url`` fails as ``fault`` (PROXY_FAULTS)."""
        return f"https://127.0.0.1:{self.proxy_fault_ports[fault]}/ok"

    def h2(self, path: str) -> str:
        """A URL of the HTTP/2 server; each path has a listener (an origin, a connection) of its own,
        so one case's GOAWAY or protocol error cannot fail another case's multiplexed stream."""
        return f"https://127.0.0.1:{self.h2_ports[urlsplit(path).path]}{path}"

    # life cycle -------------------------------------------------------------------------------

    def start(self) -> HostileServers:
        self._thread.start()
        self._blackhole.bind(("127.0.0.1", self.blackhole_port))
        self._blackhole.listen(64)
        self._run(self._start())
        return self

    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _track(self, handler: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._connections.add(task)
            try:
                await handler(reader, writer)
            except asyncio.CancelledError:
                writer.transport.abort()  # shutting down; ending normally keeps asyncio's stream callback quiet
            finally:
                self._connections.discard(task)

        return tracked

    async def _start(self) -> None:
        recorder = self.recorder
        for host in HOSTS:
            base = f"http://{_netloc(host, self.http_port)}"
            self._servers.append(
                await asyncio.start_server(
                    self._track(functools.partial(serve_http1, recorder=recorder, base=base)),
                    host, self.http_port, limit=MAX_REQUEST_BYTES,
                )
            )
        for name, port in self.tls_ports.items():
            context = _server_context(self._tls_certs[name], ["http/1.1"])
            base = f"https://127.0.0.1:{port}"
            self._servers.append(
                await asyncio.start_server(
                    self._track(functools.partial(serve_http1, recorder=recorder, base=base)),
                    "127.0.0.1", port, ssl=context, limit=MAX_REQUEST_BYTES, ssl_handshake_timeout=10,
                )
            )

        async def h2_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await H2Connection(reader, writer, recorder).run()

        h2_context = _server_context(self.certs.server, ["h2"])
        self._servers.append(
            await asyncio.start_server(
                self._track(h2_handler), "127.0.0.1", self.h2_self_signed_port,
                ssl=_server_context(self._tls_certs["self_signed"], ["h2"]), ssl_handshake_timeout=10,
            )
        )
        for port in self.h2_ports.values():
            self._servers.append(
                await asyncio.start_server(
                    self._track(h2_handler), "127.0.0.1", port, ssl=h2_context, ssl_handshake_timeout=10
                )
            )

        faults = {port: fault for fault, port in self.proxy_fault_ports.items()}
        tunnel_ports = {self.http_port, *self.tls_ports.values(), *self.h2_ports.values()}
        self._servers.append(
            await asyncio.start_server(
                self._track(functools.partial(serve_proxy, faults=faults, tunnel_ports=tunnel_ports)),
                "127.0.0.1", self.proxy_port,
            )
        )

        async def eof_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        self._servers.append(await asyncio.start_server(self._track(eof_handler), "127.0.0.1", self.tls_eof_port))

    def close(self) -> None:
        async def stop() -> None:
            for server in self._servers:
                server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._run(stop(), timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self._blackhole.close()

    def __enter__(self) -> HostileServers:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _server_context(pair: tuple[Path, Path], alpn: list[str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pair[0]), str(pair[1]))
    context.set_alpn_protocols(alpn)
    return context
