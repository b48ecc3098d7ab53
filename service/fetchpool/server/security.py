"""Caller-facing security of the gRPC port: TLS / mutual TLS, and bearer tokens for fetching and for admin.

Two credentials, checked by :class:`AuthInterceptor`:

- the *fetch* token (``--auth-token-file`` / ``--auth-token``), optional: when set, every call but
  the health checks needs it (or the admin token);
- the *admin* token (``--admin-token-file``): when set, only it may call the methods that change the
  service's state (:data:`ADMIN_WRITE_METHODS`, today ``PoolAdmin.SetPoolLimits``); a caller holding
  only the fetch token gets ``PERMISSION_DENIED``. Without it those methods need what every other
  method needs (the fetch token, or nothing): keep an admin token on any port other callers reach.

Token files hold one token per line (blank lines ignored); any listed token is accepted, and the file
is re-read when it changes, so a token is rotated without a restart and without refusing a call: add
the new token as a line, move the clients to it, remove the old line. (A Kubernetes Secret volume
replaces the file atomically; kubelet's update of it takes up to a minute or so.)
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fetchpool.config import ServerSettings
from fetchpool.errors import ConfigError
from fetchpool.server import status

logger = logging.getLogger(__name__)

#: Methods open without a token: the kubelet's gRPC probes cannot send one.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
#: Methods that change the service's state: the admin token's alone when one is configured.
ADMIN_WRITE_METHODS = frozenset({"/fetchpool.v1.PoolAdmin/SetPoolLimits"})
#: Seconds between two checks (``os.stat``) of a token file for a change.
TOKEN_RECHECK_SECONDS = 1.0


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path!r}: {exc.strerror or exc}") from None


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from ``tls_cert``/``tls_key`` (PEM files), requiring client
    certificates signed by ``tls_client_ca`` when it is set (mutual TLS); None when
    TLS is off. Raises ConfigError for a half-configured or unreadable setting."""
    if not (settings.tls_cert or settings.tls_key or settings.tls_client_ca):
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    client_ca = _read(settings.tls_client_ca, "client CA") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(_read(settings.tls_key, "TLS key"), _read(settings.tls_cert, "TLS certificate"))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _parse(text: str) -> tuple[bytes, ...]:
    return tuple(f"Bearer {line.strip()}".encode() for line in text.splitlines() if line.strip())


class Tokens:
    """The accepted ``authorization`` values: from a file (re-read when it changes) or fixed.

    Raises ConfigError at construction for an unreadable or empty file; later, an unreadable or empty
    file keeps the tokens in force (logged once per change), so a half-written rotation never opens
    or closes the port.
    """

    def __init__(
        self,
        *,
        path: str = "",
        fixed: Iterable[str] = (),
        what: str = "token file",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._what = what
        self._clock = clock
        self._next_check = 0.0
        self._stamp: tuple[int, int, int] | None = None
        self._values: tuple[bytes, ...] = _parse("\n".join(fixed))
        if path:
            self._values = self._load()
            self._stamp = self._stat()
            self._next_check = clock() + TOKEN_RECHECK_SECONDS
        if not self._values:
            raise ConfigError(f"{what} {path!r} is empty" if path else f"no {what} given")

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _load(self) -> tuple[bytes, ...]:
        return _parse(_read(self._path, self._what).decode(errors="replace"))

    def values(self) -> tuple[bytes, ...]:
        """The accepted values, re-read first when the file changed (checked at most once a second)."""
        if self._path and self._clock() >= self._next_check:
            self._next_check = self._clock() + TOKEN_RECHECK_SECONDS
            stamp = self._stat()
            if stamp is not None and stamp != self._stamp:
                self._stamp = stamp
                try:
                    loaded = self._load()
                except ConfigError as exc:
                    logger.error("%s; keeping the tokens in force", exc)
                else:
                    if loaded:
                        self._values = loaded
                        logger.info("%s %s re-read: %d token(s)", self._what, self._path, len(loaded))
                    else:
                        logger.error("%s %s is empty; keeping the tokens in force", self._what, self._path)
        return self._values

    def accepts(self, given: bytes | None) -> bool:
        """Whether ``given`` (the raw ``authorization`` value) is one of the tokens; constant-time per token."""
        if given is None:
            return False
        found = False
        for value in self.values():
            found |= hmac.compare_digest(given, value)
        return found


@dataclass(frozen=True, slots=True)
class CallerAuth:
    """The two credentials; ``None`` = not configured."""

    fetch: Tokens | None = None
    admin: Tokens | None = None

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> CallerAuth:
        """From ``auth_token_file`` / ``auth_token`` and ``admin_token_file``. Raises ConfigError."""
        fetch = None
        if settings.auth_token_file:
            fetch = Tokens(path=settings.auth_token_file, what="token file")
        elif settings.auth_token:
            fetch = Tokens(fixed=[settings.auth_token], what="auth token")
        admin = Tokens(path=settings.admin_token_file, what="admin token file") if settings.admin_token_file else None
        return cls(fetch=fetch, admin=admin)

    @property
    def enabled(self) -> bool:
        return self.fetch is not None or self.admin is not None


def _authorization(metadata: Any) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value.encode() if isinstance(value, str) else bytes(value)
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token of every call (see the module docstring for the rules).

    Refusals: ``UNAUTHENTICATED`` without a valid token, ``PERMISSION_DENIED`` for a fetch token on
    an admin write. Health checks stay open.
    """

    def __init__(self, auth: CallerAuth) -> None:
        self._auth = auth

    def _refusal(self, method: str, given: bytes | None) -> tuple[str, str] | None:
        """None when the call may go on, else (status reason, message)."""
        fetch, admin = self._auth.fetch, self._auth.admin
        if admin is not None and admin.accepts(given):
            return None  # the admin token opens every method
        if method in ADMIN_WRITE_METHODS and admin is not None:
            if fetch is not None and fetch.accepts(given):
                return "ADMIN_TOKEN_REQUIRED", f"{method.rsplit('/', 1)[-1]} needs the admin token"
            return "BAD_ADMIN_TOKEN", "missing or wrong admin bearer token: send `authorization: Bearer <admin token>`"
        if fetch is None or fetch.accepts(given):
            return None
        return "BAD_TOKEN", "missing or wrong bearer token: send the metadata `authorization: Bearer <token>`"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        refusal = self._refusal(method, _authorization(handler_call_details.invocation_metadata))
        return handler if refusal is None else _refusing(handler, *refusal)


def _refusing(handler: grpc.RpcMethodHandler, reason: str, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with ``reason`` (a key of
    ``fetchpool.server.status.REASONS``: its code and an ErrorInfo)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await status.abort(context, reason, message)

    codec = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **codec)
    return grpc.stream_stream_rpc_method_handler(refuse, **codec)
