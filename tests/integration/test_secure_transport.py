"""TLS, mutual TLS and the bearer token on the gRPC port, with a real server and real gRPC clients."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from fetchpool.client import FetchClient
from support import Certs, Nginx
from support.fetchpool_service import FetchpoolService

TOKEN = "s3cret-token-value"


def _tls_service(start_service: ..., certs: Certs, tmp_path: Path, *extra: str) -> FetchpoolService:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    probe = _credentials(certs, certs.issue("probe", "probe.test"))  # health needs no token, mTLS a cert
    return start_service(
        "--tls-cert", str(certs.cert_pem), "--tls-key", str(certs.key_pem), "--auth-token-file", str(token), *extra,
        credentials=probe,
    )


def _credentials(certs: Certs, client: tuple[Path, Path] | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=certs.ca_pem.read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )


async def _code(client: FetchClient, url: str) -> grpc.StatusCode:
    try:
        await client.fetch(url)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_tls_with_a_bearer_token(start_service: ..., certs: Certs, nginx: Nginx, tmp_path: Path) -> None:
    service = _tls_service(start_service, certs, tmp_path)
    url = f"{nginx.http_url}/small.html"
    async with FetchClient(f"localhost:{service.port}", credentials=_credentials(certs), token=TOKEN) as client:
        assert await _code(client, url) is grpc.StatusCode.OK
    async with FetchClient(f"localhost:{service.port}", credentials=_credentials(certs), token="wrong") as client:
        assert await _code(client, url) is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.pool_stats()  # admin calls are guarded too
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    async with FetchClient(f"localhost:{service.port}", credentials=_credentials(certs)) as client:
        assert await _code(client, url) is grpc.StatusCode.UNAUTHENTICATED
        assert await client.health() == 1  # the kubelet's probe sends no token
    async with FetchClient(f"localhost:{service.port}", token=TOKEN, timeout=3) as plaintext:
        assert await _code(plaintext, url) is grpc.StatusCode.UNAVAILABLE
    assert TOKEN not in service.output()


async def test_mutual_tls_requires_a_client_certificate(
    start_service: ..., certs: Certs, nginx: Nginx, tmp_path: Path
) -> None:
    service = _tls_service(start_service, certs, tmp_path, "--tls-client-ca", str(certs.ca_pem))
    url = f"{nginx.http_url}/small.html"
    client_pair = certs.issue("client", "caller.test")
    async with FetchClient(
        f"localhost:{service.port}", credentials=_credentials(certs, client_pair), token=TOKEN
    ) as client:
        assert await _code(client, url) is grpc.StatusCode.OK
    async with FetchClient(f"localhost:{service.port}", credentials=_credentials(certs), token=TOKEN, timeout=3) as c:
        assert await _code(c, url) is grpc.StatusCode.UNAVAILABLE
    stranger = certs.untrusted()
    async with FetchClient(
        f"localhost:{service.port}", credentials=_credentials(certs, stranger), token=TOKEN, timeout=3
    ) as client:
        assert await _code(client, url) is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--tls-cert", "/nonexistent/cert.pem"), "needs both"),
        (("--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"), "No such file"),
        (("--auth-token-file", "/nonexistent/token"), "token file"),
    ],
)
def test_bad_security_settings_are_refused_at_start_up(certs: Certs, flags: tuple[str, ...], message: str) -> None:
    service = FetchpoolService(*flags, ca_pem=certs.ca_pem)
    try:
        with pytest.raises(Exception):  # noqa: B017 - ServerStartError carries the output
            service.start(timeout=10)
        assert message in service.output() and "Traceback" not in service.output()
    finally:
        service.close()
