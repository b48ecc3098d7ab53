"""The test servers work, checked with plain httpx: nginx (HTTP/1.1, HTTP/2, access log, doc
site), tinyproxy and squid (CONNECT tunnels, restart on the same port), the hypercorn app, and
the TLS fault certificates."""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from pathlib import Path

import httpx
import pytest
from support import SITE_PAGES, Certs, Nginx, Squid, Tinyproxy, free_port
from support.app import expected_bytes
from support.servers import AppServer


def _client(certs: Certs, proxy: str | None = None, base_url: str = "") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        http2=True, verify=certs.client_context(), timeout=10.0, proxy=proxy, base_url=base_url
    )


async def test_nginx_serves_small_html_over_http2_and_logs_it(nginx: Nginx, certs: Certs) -> None:
    since = nginx.log_offset()
    async with httpx.AsyncClient(
        http2=True, verify=ssl.create_default_context(cafile=str(certs.ca_pem))
    ) as client:
        response = await client.get(f"{nginx.https_url}/small.html")
    assert response.status_code == 200
    assert response.http_version == "HTTP/2"
    assert len(response.content) == SITE_PAGES["small.html"]

    [entry] = nginx.access_log(since, min_entries=1)
    assert entry["server_protocol"] == "HTTP/2.0"
    assert entry["request_uri"] == "/small.html"
    assert entry["status"] == 200
    assert entry["body_bytes_sent"] == SITE_PAGES["small.html"]
    assert entry["server_port"] == nginx.https_port
    assert isinstance(entry["connection"], int) and entry["connection"] >= 1
    assert entry["http_user_agent"].startswith("python-httpx/")


async def test_nginx_multiplexes_concurrent_h2_requests_on_one_connection(nginx: Nginx, certs: Certs) -> None:
    since = nginx.log_offset()
    async with _client(certs) as client:
        responses = await asyncio.gather(
            *(client.get(f"{nginx.https_url}/large.html?i={i}") for i in range(8))
        )
    assert {r.status_code for r in responses} == {200}
    assert all(len(r.content) == SITE_PAGES["large.html"] for r in responses)
    assert len(nginx.distinct_connections(since, min_entries=8)) == 1


async def test_nginx_plain_http1_and_doc_site(nginx: Nginx, doc_root: Path, doc_pages: list[str]) -> None:
    assert len(doc_pages) >= 300
    page = "library/asyncio.html" if "library/asyncio.html" in doc_pages else doc_pages[0]
    since = nginx.log_offset()
    async with httpx.AsyncClient(timeout=10.0) as client:
        response = await client.get(f"{nginx.http_url}/doc/{page}")
    assert response.status_code == 200
    assert response.http_version == "HTTP/1.1"
    assert response.content == (doc_root / page).read_bytes()
    [entry] = nginx.access_log(since, min_entries=1)
    assert entry["server_protocol"] == "HTTP/1.1"
    assert entry["request_uri"] == f"/doc/{page}"


async def test_tinyproxy_tunnels_connect_to_nginx_tls(
    tinyproxy: Tinyproxy, nginx: Nginx, certs: Certs
) -> None:
    since = tinyproxy.log_offset()
    async with _client(certs, proxy=tinyproxy.url) as client:
        response = await client.get(f"{nginx.https_url}/small.html")
    assert response.status_code == 200
    assert response.http_version == "HTTP/2"
    assert f"CONNECT 127.0.0.1:{nginx.https_port}" in tinyproxy.log_text(since)


async def test_tinyproxy_refuses_connect_to_unlisted_port(tinyproxy: Tinyproxy, certs: Certs) -> None:
    async with _client(certs, proxy=tinyproxy.url) as client:
        with pytest.raises(httpx.ProxyError, match="403"):
            await client.get(f"https://127.0.0.1:{free_port()}/")


async def test_tinyproxy_basic_auth_and_restart_on_same_port(nginx: Nginx, certs: Certs) -> None:
    url = f"{nginx.https_url}/small.html"
    with Tinyproxy(allow_connect_ports=[nginx.https_port], basic_auth=("fetch", "s3cret")) as proxy:
        async with _client(certs, proxy=f"http://127.0.0.1:{proxy.port}") as client:
            with pytest.raises(httpx.ProxyError, match="407"):
                await client.get(url)
        async with _client(certs, proxy=proxy.url) as client:
            assert (await client.get(url)).status_code == 200

        port = proxy.port
        proxy.kill()
        async with _client(certs, proxy=proxy.url) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(url)

        proxy.start()
        assert proxy.port == port
        async with _client(certs, proxy=proxy.url) as client:
            assert (await client.get(url)).status_code == 200


async def test_squid_tunnels_connect_to_nginx_tls(squid: Squid, nginx: Nginx, certs: Certs) -> None:
    since = squid.log_offset()
    async with _client(certs, proxy=squid.url) as client:
        response = await client.get(f"{nginx.https_url}/small.html")
        with pytest.raises(httpx.ProxyError, match="403"):
            await client.get(f"https://127.0.0.1:{free_port()}/")
    assert response.status_code == 200
    assert response.http_version == "HTTP/2"
    expected = f"CONNECT 127.0.0.1:{nginx.https_port}"
    deadline = time.monotonic() + 10  # squid writes its access log when the tunnel closes, a bit later
    while expected not in (log := squid.access_log_text(since)) and time.monotonic() < deadline:  # noqa: ASYNC110 - a file squid writes
        await asyncio.sleep(0.1)
    assert "TCP_TUNNEL/200" in log and expected in log


async def test_app_server_endpoints(app_server: AppServer, certs: Certs) -> None:
    async with _client(certs, base_url=app_server.https_url) as client:
        echo = await client.post(
            "/echo?a=1&a=2", content=b"\x00body", headers=[("x-dup", "1"), ("x-dup", "2")]
        )
        assert echo.http_version == "HTTP/2"
        payload = echo.json()
        assert payload["method"] == "POST" and payload["query"] == "a=1&a=2"
        assert [v for k, v in payload["headers"] if k == "x-dup"] == ["1", "2"]
        assert base64.b64decode(payload["body_b64"]) == b"\x00body"

        loop = asyncio.get_running_loop()
        started = loop.time()
        delayed = await client.get("/delay", params={"s": "0.3"})
        assert delayed.status_code == 200 and loop.time() - started >= 0.3

        unavailable = await client.get("/status/503", params={"retry_after": "1"})
        assert unavailable.status_code == 503 and unavailable.headers["retry-after"] == "1"

        body = await client.get("/bytes", params={"n": "200000"})
        assert body.content == expected_bytes(200_000)
        assert body.headers["content-length"] == "200000"

        redirected = await client.get("/redirect/3", follow_redirects=True)
        assert redirected.status_code == 200 and len(redirected.history) == 3
        with pytest.raises(httpx.TooManyRedirects):
            await client.get("/redirect-loop", follow_redirects=True)

        statuses = [
            (await client.get("/flaky", params={"key": "smoke", "fail": "2"})).status_code for _ in range(3)
        ]
        assert statuses == [503, 503, 200]

        big = await client.get("/headers-big", params={"n": "8000"})
        assert sum(len(v) for k, v in big.headers.items() if k.startswith("x-big-")) >= 8000

    async with httpx.AsyncClient(base_url=app_server.http_url, timeout=10.0) as client:
        plain = await client.get("/echo")
        assert plain.http_version == "HTTP/1.1" and plain.json()["scheme"] == "http"


@pytest.mark.parametrize("fault", ["expired", "wrong_host", "untrusted"])
async def test_fault_certs_fail_verification(fault: str, site_root: Path, certs: Certs) -> None:
    tls_cert = getattr(certs, fault)()
    with Nginx(site_root, certs, tls_cert=tls_cert) as origin:
        async with _client(certs) as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(f"{origin.https_url}/small.html")
