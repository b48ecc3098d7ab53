"""What a fault of the test relay is, which connections get one (``Plan``), where in a
connection's bytes it fires (``Tracker``), and what the relay logs (``ConnectionLog``).

Stages, in the order a connection meets them (``STAGES``):

  connect   just accepted, nothing read yet
  proxy     the proxy's answer to CONNECT (HTTP) or to the SOCKS5 greeting and request
  tls       the server's first TLS flight (ServerHello, certificate): the handshake
  request   the client's first application bytes (its request, or HTTP/2 preface)
  headers   the first bytes the server sends after the request began
  body      the response further on (plain HTTP/1.1: past the end of the headers)

A ``Fault(stage, action, offset)`` fires when the stage's bytes reach ``offset`` (counted in the
direction that stage is about: the server's for proxy, tls, headers and body, the client's for
request): that many bytes are forwarded first, then ``reset``, ``half_close`` or ``hold``. A
fault whose stage the connection never reaches is not injected.

The protocol is recognised from the first bytes: TLS (0x16), SOCKS5 (0x05), ``CONNECT`` (an HTTP
proxy tunnel, whose content is recognised again), else plain HTTP. TLS is taken to be 1.3 (what
nginx, hypercorn and Python's ssl negotiate): the client's second application-data record is its
first after the handshake (the first carries its Finished).

Standard library only: the relay process (_relay.py) imports it as a top-level module.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

Peer = tuple[str, int]
STAGES = ("connect", "proxy", "tls", "request", "headers", "body")
ACTIONS = ("reset", "half_close", "hold")
#: Stages during which no response byte can have reached the client yet.
BEFORE_RESPONSE = ("connect", "proxy", "tls", "request")
#: Bytes read at once from either side.
CHUNK = 65536
#: Server's bytes of a TLS-protected response forwarded before a body fault (the headers and
#: HTTP/2 SETTINGS are well within this), unless the fault's offset says more.
TLS_BODY_MIN = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class Fault:
    """``action`` at ``stage`` once ``offset`` bytes of it were forwarded (see the module doc)."""

    stage: str
    action: str
    offset: int = 0

    def __post_init__(self) -> None:
        if self.stage not in STAGES or self.action not in ACTIONS or self.offset < 0:
            raise ValueError(f"bad fault {self}")


#: Offsets drawn per stage: [low, high) bytes.
OFFSETS: dict[str, tuple[int, int]] = {
    "connect": (0, 1),
    "proxy": (0, 12),  # the shortest answer, SOCKS5's, has 2 + 10 bytes
    "tls": (0, 400),  # a server's first flight carries a certificate: more than this
    "request": (0, 16),
    "headers": (0, 8),  # plain HTTP: within the status line
    "body": (1, 32768),  # past the headers (plain) or past TLS_BODY_MIN (TLS)
}


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """Which connections get which fault. Connection number ``index`` (0-based, in accept order)
    gets one if ``index < count`` (None: any) and its RNG, seeded with (seed, index), draws below
    ``rate``: a stage from ``stages``, an action from ``actions``, an offset from ``offsets``
    ((stage, low, high) entries, [low, high) bytes; OFFSETS for the stages they do not name).
    ``Plan()`` injects nothing."""

    rate: float = 0.0
    stages: tuple[str, ...] = STAGES
    actions: tuple[str, ...] = ("reset", "half_close")
    offsets: tuple[tuple[str, int, int], ...] = ()
    count: int | None = None

    def fault(self, index: int, seed: int) -> Fault | None:
        if self.count is not None and index >= self.count:
            return None
        rng = random.Random(f"{seed}:{index}")
        if rng.random() >= self.rate:
            return None
        ranges = {**OFFSETS, **{stage: (low, high) for stage, low, high in self.offsets}}
        stage = rng.choice(self.stages)
        return Fault(stage, rng.choice(self.actions), rng.randrange(*ranges[stage]))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(data["rate"], tuple(data["stages"]), tuple(data["actions"]),
                   tuple((s, low, high) for s, low, high in data["offsets"]), data["count"])


@dataclasses.dataclass
class ConnectionLog:
    """What happened on one relayed connection (bytes are counted as forwarded)."""

    index: int
    client: Peer
    planned: Fault | None
    upstream_local: Peer | None = None  # the relay's end towards the upstream ($remote_port to nginx)
    protocol: str = ""  # "plain", "tls", "connect+tls", "connect+plain", "socks5+tls", ...
    stage: str = "connect"  # the last stage reached
    injected: Fault | None = None  # the fault that fired, with the offset at which it did
    to_upstream: int = 0
    to_client: int = 0
    #: Server bytes forwarded after the client's first application byte (responses, and under
    #: TLS also session tickets and HTTP/2 SETTINGS, which cannot be told apart).
    response_bytes: int = 0
    #: Plain HTTP/1.1: server bytes forwarded since the client last started sending (the
    #: response to the request in flight so far).
    exchange_response_bytes: int = 0
    error: str = ""
    closed: bool = False

    @property
    def before_response(self) -> bool:
        """A fault fired while provably no response byte had reached the client on this
        connection (so every request on it failed before it was answered)."""
        return self.injected is not None and (self.injected.stage in BEFORE_RESPONSE or self.response_bytes == 0)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConnectionLog:
        def fault(value: dict[str, Any] | None) -> Fault | None:
            return None if value is None else Fault(**value)

        def peer(value: list[Any] | None) -> Peer | None:
            return None if value is None else (value[0], value[1])

        client = peer(data.pop("client"))
        assert client is not None
        return cls(**{**data, "client": client, "planned": fault(data.pop("planned")),
                      "injected": fault(data.pop("injected")), "upstream_local": peer(data.pop("upstream_local"))})


class Tracker:
    """Follows one connection's stages from the bytes both ways and says where its fault fires.

    ``client_bytes``/``server_bytes`` take the next chunk of one direction and return how many of
    its bytes to forward, and whether the fault fires after them (``fired_offset`` then holds
    the stage's byte count at that point).
    """

    def __init__(self, log: ConnectionLog, fault: Fault | None) -> None:
        self.log = log
        self.fault = fault
        self.outer = ""  # tls | plain | socks5 | connect
        self.tunnelled = False  # the proxy's answer is complete
        self.inner = ""  # tls | plain: what the connection (or the tunnel) carries
        self.proxy_reply = b""
        self.tls = False
        self.tls_s2c = 0  # server bytes of the TLS handshake seen
        self.client_records = _ClientRecords()
        self.app_started = False
        self.app_c2s = 0
        self.head = b""  # plain: the start of the first response, until its headers end
        self.header_end = -1
        self.last_from_client = True
        self.fired_offset = 0

    def _fires(self, stage: str, done: int, size: int) -> int | None:
        """If the fault is at ``stage`` and its offset lies within the next ``size`` bytes of a
        stage counter now at ``done``: the bytes to forward before it fires."""
        fault = self.fault
        if fault is None or fault.stage != stage or self.log.injected is not None:
            return None
        if done + size < fault.offset or (done + size == fault.offset and stage != "request"):
            return None
        self.fired_offset = max(done, fault.offset)
        return max(0, fault.offset - done)

    def client_bytes(self, data: bytes) -> tuple[int, bool]:
        log = self.log
        if not self.outer:
            self.outer = log.protocol = _protocol(data)
            if self.outer in ("socks5", "connect"):
                log.stage = "proxy"
        if self.outer in ("socks5", "connect") and not self.tunnelled:
            return len(data), False
        if not self.inner:
            self._payload(self.outer if self.outer in ("tls", "plain") else _protocol(data))
        if not self.app_started:
            start = self.client_records.app_data_start(data) if self.tls else 0
            if start is None:
                return len(data), False
            self.app_started = True
            log.stage = "request"
            cut = self._fires("request", 0, len(data) - start)
            if cut is not None:
                return start + cut, True
            self.app_c2s = len(data) - start
            return len(data), False
        if not self.last_from_client:
            self.last_from_client = True
            log.exchange_response_bytes = 0
        cut = self._fires("request", self.app_c2s, len(data))
        if cut is not None:
            return cut, True
        self.app_c2s += len(data)
        return len(data), False

    def server_bytes(self, data: bytes) -> tuple[int, bool]:
        log = self.log
        if self.outer in ("socks5", "connect") and not self.tunnelled:
            cut = self._fires("proxy", len(self.proxy_reply), len(data))
            if cut is not None:
                return cut, True
            self.proxy_reply += data
            self.tunnelled = _proxy_reply_complete(self.outer, self.proxy_reply)
            return len(data), False
        if not self.app_started:
            cut = self._fires("tls", self.tls_s2c, len(data)) if self.tls else None
            if cut is not None:
                return cut, True
            self.tls_s2c += len(data)
            return len(data), False
        self.last_from_client = False
        if log.stage == "request":
            log.stage = "headers"
        body_start = self._body_start(data)
        cut = self._fires("headers", log.response_bytes, len(data))
        if cut is None and body_start is not None and self.fault is not None:
            cut = self._fires("body", log.response_bytes - body_start, len(data))
        forwarded = len(data) if cut is None else cut
        log.response_bytes += forwarded
        log.exchange_response_bytes += forwarded
        if body_start is not None and log.response_bytes > body_start:
            log.stage = "body"
        return forwarded, cut is not None

    def _body_start(self, data: bytes) -> int | None:
        """response_bytes where the body starts: past the first response's headers (plain), or
        past TLS_BODY_MIN (TLS, where headers cannot be seen); None while unknown."""
        if self.tls:
            return TLS_BODY_MIN
        if self.header_end < 0 and len(self.head) < CHUNK:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end >= 0:
                self.header_end = end + 4
        return self.header_end if self.header_end >= 0 else None

    def _payload(self, kind: str) -> None:
        self.inner = kind
        self.tls = kind == "tls"
        if self.outer in ("socks5", "connect"):
            self.log.protocol = f"{self.outer}+{kind}"
        if self.tls:
            self.log.stage = "tls"


def _protocol(data: bytes) -> str:
    if data[:1] == b"\x16":
        return "tls"
    if data[:1] == b"\x05":
        return "socks5"
    if data[:8].upper() == b"CONNECT ":
        return "connect"
    return "plain"


def _proxy_reply_complete(kind: str, reply: bytes) -> bool:
    if kind == "connect":
        return b"\r\n\r\n" in reply
    # SOCKS5: the method selection (2 bytes), then VER REP RSV ATYP ADDR PORT.
    if len(reply) < 2 + 5:
        return False
    atyp = reply[2 + 3]
    length = {1: 4, 4: 16}.get(atyp, 1 + reply[2 + 4])
    return len(reply) >= 2 + 4 + length + 2


class _ClientRecords:
    """Finds where the client's application data starts in a TLS 1.3 stream: at its second
    application-data record (the first carries its Finished message)."""

    def __init__(self) -> None:
        self.seen = b""  # the handshake is a few hundred bytes: kept whole until data starts

    def app_data_start(self, data: bytes) -> int | None:
        """Where in ``data`` application data starts (0 if it started in a split record
        header), or None if it has not started yet."""
        before = len(self.seen)
        self.seen += data
        position = records = 0
        while len(self.seen) - position >= 5:
            if self.seen[position] == 23:
                records += 1
                if records == 2:
                    return max(0, position - before)
            position += 5 + int.from_bytes(self.seen[position + 3 : position + 5], "big")
        return None
