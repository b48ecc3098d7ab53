"""What goes into the engine and what comes out; no protobuf here."""

from __future__ import annotations

from dataclasses import dataclass, field

from fetchpool.errors import ErrorKind

Headers = list[tuple[str, str]]


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchSpec:
    """One fetch as the engine sees it.

    ``timeout`` is total seconds (None: the server default); ``max_body_bytes``
    0 means the server default; ``follow_redirects`` None means the default;
    ``tls_insecure_skip_verify`` accepts any certificate, for this request only;
    ``keep_cookies`` keeps and sends the cookies of the ``session_key``'s session.
    """

    url: str
    method: str = "GET"
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    timeout: float | None = None
    follow_redirects: bool | None = None
    max_body_bytes: int = 0
    session_key: str = ""
    tls_insecure_skip_verify: bool = False
    keep_cookies: bool = False


@dataclass(slots=True)
class Timings:
    """Seconds spent per phase, summed over attempts and redirects (0 when a phase did not happen)."""

    pool_wait: float = 0.0
    connect: float = 0.0
    proxy_connect: float = 0.0
    tls: float = 0.0
    ttfb: float = 0.0
    total: float = 0.0


@dataclass(slots=True)
class Outcome:
    """The result of one fetch: a response, or ``error_kind`` with ``error_message``.

    ``redirects`` are the redirect responses followed, in order, as (URL, status);
    ``remote_address`` is "ip:port" of the peer the last response came from (the target,
    or the proxy); ``tls_version`` that of the connection to the target ("TLSv1.3"; "" for
    cleartext); ``content_decoded`` says ``body`` was decoded from its Content-Encoding.
    ``retry_reasons`` say, in order, why a send was repeated (``attempts`` - 1 of them): the
    failure's kind and message ("NETWORK: connection failed: ... reset by peer"), "status 503"
    for a retried status, or "GOAWAY: ..." for a request the server refused unprocessed.
    """

    url: str
    final_url: str = ""
    status_code: int = 0
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    http_version: str = ""
    connection_reused: bool = False
    timings: Timings = field(default_factory=Timings)
    error_kind: ErrorKind | None = None
    error_message: str = ""
    pool: str = ""
    attempts: int = 0
    redirects: list[tuple[str, int]] = field(default_factory=list)
    remote_address: str = ""
    tls_version: str = ""
    content_decoded: bool = False
    retry_reasons: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No error (any HTTP status counts as a response)."""
        return self.error_kind is None
