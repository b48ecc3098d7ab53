"""Caller-facing security of the gRPC port: TLS / mutual TLS and a bearer-token check."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from fetchpool.config import ServerSettings
from fetchpool.errors import ConfigError
from fetchpool.server import status

#: Methods open without a token: the kubelet's gRPC probes cannot send one.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


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


def load_token(settings: ServerSettings) -> str | None:
    """The bearer token callers must send, from ``auth_token_file`` or ``auth_token``; None = no check.

    Raises ConfigError for an unreadable or empty token file.
    """
    token = _read(settings.auth_token_file, "token file").decode().strip() if settings.auth_token_file \
        else settings.auth_token
    if settings.auth_token_file and not token:
        raise ConfigError(f"token file {settings.auth_token_file!r} is empty")
    return token or None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` with UNAUTHENTICATED.

    The comparison is constant-time (``hmac.compare_digest``); health checks stay open.
    """

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES) or self._authorized(
            handler_call_details.invocation_metadata
        ):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await status.abort(context, "BAD_TOKEN",
                           "missing or wrong bearer token: send the metadata `authorization: Bearer <token>`")

    codec = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **codec)
    return grpc.stream_stream_rpc_method_handler(refuse, **codec)
