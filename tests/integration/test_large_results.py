"""Results larger than a default gRPC client accepts (4 MiB), with callers fetchpool did not write:
grpcio on default options with reflection-built messages, and @grpc/grpc-js from npm."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc
import pytest
from fetchpool.client import FetchClient, make_request
from fetchpool.v1 import fetch_pb2 as pb
from support import Nginx
from support.callers import ReflectedClient, run_node, unpacked, whole
from support.fetchpool_service import FetchpoolService

MiB = 1024 * 1024
#: Page name -> size; "20" needs --max-body-bytes above the default 10 MiB.
SIZES = {"3.9": int(3.9 * MiB), "4": 4 * MiB, "8": 8 * MiB, "20": 20 * MiB}
#: Parts a 4 MiB-per-message caller receives for each page (headers and fields take a few hundred bytes).
PARTS = {"3.9": 1, "4": 2, "8": 3, "20": 6}
JAPANESE = "日本語のテキスト、文字コードの試験。".encode()


@pytest.fixture(scope="module")
def pages(site_root: Path) -> dict[str, str]:
    """Random pages of SIZES in the nginx root: name -> sha256; plus "text", ~6 MiB of UTF-8 HTML."""
    digests = {}
    for name, size in SIZES.items():
        data = os.urandom(size)
        (site_root / f"big-{name}.bin").write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    text = b"<!DOCTYPE html><meta charset=utf-8><p>" + JAPANESE * (6 * MiB // len(JAPANESE)) + b"</p>"
    (site_root / "big-text.html").write_bytes(text)
    digests["text"] = hashlib.sha256(text).hexdigest()
    return digests


@pytest.fixture(scope="module")
def large_service(certs: ..., nginx: Nginx) -> FetchpoolService:
    with FetchpoolService("--max-body-bytes", str(25 * MiB), ca_pem=certs.ca_pem) as running:
        yield running


def _url(nginx: Nginx, name: str) -> str:
    return f"{nginx.https_url}/big-{name}.bin" if name != "text" else f"{nginx.https_url}/big-text.html"


def _batch(nginx: Nginx) -> list[tuple[str, str]]:
    """(id, url) of a batch mixing the large pages with a small one and a failing one."""
    return [("small", f"{nginx.https_url}/small.html"), *((name, _url(nginx, name)) for name in SIZES),
            ("refused", "http://127.0.0.1:1/")]


def _check(results: dict[str, tuple[str, int, int]], pages: dict[str, str]) -> None:
    """results: id -> (sha256, parts, body_size)."""
    assert set(results) == {"small", "refused", *SIZES}
    for name, size in SIZES.items():
        assert results[name] == (pages[name], PARTS[name], size), name
    assert results["small"][1] == 1 and results["refused"][2] == 0


@pytest.mark.parametrize("packed", [False, True], ids=["one-per-message", "packed"])
def test_a_default_grpcio_caller_gets_every_result_of_a_batch(
    large_service: FetchpoolService, nginx: Nginx, pages: dict[str, str], packed: bool
) -> None:
    # Packed, every message stays within the caller's 4 MiB too (gRPC would end the call otherwise).
    with ReflectedClient(large_service.target) as client:
        requests = [client.request(id=i, url=url) for i, url in _batch(nginx)]
        if packed:
            many_messages = unpacked(client.fetch_many_packed(requests, timeout=60))
            stream_messages = unpacked(client.fetch_stream_packed(iter(requests), timeout=60))
        else:
            many_messages = client.fetch_many(requests, timeout=60)
            stream_messages = client.fetch_stream(iter(requests), timeout=60)
        many = {r.id: (hashlib.sha256(r.body).hexdigest(), n, r.body_size) for r, n in whole(many_messages)}
        stream = {r.id: (hashlib.sha256(r.body).hexdigest(), n, r.body_size) for r, n in whole(stream_messages)}
    _check(many, pages)
    _check(stream, pages)


async def test_a_default_grpc_js_caller_gets_every_result_of_a_batch(
    large_service: FetchpoolService, nginx: Nginx, pages: dict[str, str], node_clients: None
) -> None:
    requests = [{"id": i, "url": url} for i, url in _batch(nginx)]
    for rpc in ("FetchMany", "FetchStream", "FetchManyPacked", "FetchStreamPacked"):
        results, done = await run_node({"target": large_service.target, "rpc": rpc, "requests": requests})
        assert done["code"] == 0, done
        _check({r["id"]: (r["sha256"], r["parts"], r["body_size"]) for r in results}, pages)
        assert all(r["body_length"] == r["body_size"] for r in results)


def test_text_is_sent_in_parts_cut_between_characters(
    large_service: FetchpoolService, nginx: Nginx, pages: dict[str, str]
) -> None:
    with ReflectedClient(large_service.target) as client:
        [(result, parts)] = whole(client.fetch_many([client.request(url=_url(nginx, "text"), include_text=True)]))
    assert parts == 4  # 6 MiB of body, then 6 MiB of text, in messages of at most 4 MiB
    assert hashlib.sha256(result.body).hexdigest() == pages["text"]
    assert result.encoding == "utf-8" and result.text == result.body.decode()


async def test_unary_fetch_of_a_large_page_is_a_too_large_result_that_names_the_fix(
    large_service: FetchpoolService, nginx: Nginx, pages: dict[str, str], node_clients: None
) -> None:
    with ReflectedClient(large_service.target) as client:
        fits = client.fetch(url=_url(nginx, "3.9"), timeout=60)
        refused = client.fetch(url=_url(nginx, "8"), timeout=60)
    assert hashlib.sha256(fits.body).hexdigest() == pages["3.9"] and not fits.HasField("error")
    assert refused.error.kind == 10 and refused.status_code == 200 and refused.body == b""  # TOO_LARGE
    assert refused.body_size == SIZES["8"]
    for remedy in ("FetchMany", "FetchStream", "max_message_bytes", "max receive message size"):
        assert remedy in refused.error.message
    [node_result], done = await run_node(
        {"target": large_service.target, "rpc": "Fetch", "requests": [{"url": _url(nginx, "8")}]})
    assert done["code"] == 0 and node_result["error_kind"] == "TOO_LARGE" and node_result["body_size"] == SIZES["8"]


async def test_a_caller_may_ask_for_larger_messages(
    large_service: FetchpoolService, nginx: Nginx, pages: dict[str, str], node_clients: None
) -> None:
    options = [("grpc.max_receive_message_length", 32 * MiB)]
    with ReflectedClient(large_service.target, options) as client:
        result = client.fetch(url=_url(nginx, "20"), max_message_bytes=32 * MiB, timeout=60)
        many = list(client.fetch_many([client.request(url=_url(nginx, "20"))], max_message_bytes=32 * MiB))
    assert hashlib.sha256(result.body).hexdigest() == pages["20"]
    assert [(m.part, m.more_parts, m.body_size) for m in many] == [(0, False, SIZES["20"])]
    # Asking for more than the client accepts is the caller's mistake: gRPC refuses that message alone.
    with ReflectedClient(large_service.target) as client, pytest.raises(grpc.RpcError) as refused:
        client.fetch(url=_url(nginx, "8"), max_message_bytes=32 * MiB, timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    results, done = await run_node({
        "target": large_service.target, "rpc": "FetchMany", "max_message_bytes": 32 * MiB,
        "channel_options": {"grpc.max_receive_message_length": 32 * MiB},
        "requests": [{"url": _url(nginx, "20")}]})
    assert done["code"] == 0 and [(r["sha256"], r["parts"]) for r in results] == [(pages["20"], 1)]


async def test_fetch_client_joins_parts(large_service: FetchpoolService, nginx: Nginx, pages: dict[str, str]) -> None:
    async with FetchClient(large_service.target) as client:
        batch = [make_request(_url(nginx, name), id=name) for name in SIZES]
        results = {r.id: r async for r in client.fetch_many(batch)}
        single = await client.fetch(_url(nginx, "20"))
    assert {name: hashlib.sha256(r.body).hexdigest() for name, r in results.items()} == {n: pages[n] for n in SIZES}
    assert all(not r.more_parts and r.part == 0 for r in results.values())
    assert hashlib.sha256(single.body).hexdigest() == pages["20"]


@pytest.mark.parametrize("packed", [False, True], ids=["one-per-message", "packed"])
def test_a_multi_megabyte_url_fails_alone_within_the_callers_limit(
    large_service: FetchpoolService, nginx: Nginx, packed: bool
) -> None:
    # Its result used to echo all 5 MB of it: over the caller's 4 MiB, which ended the call.
    huge = f"{nginx.https_url}/small.html?q=" + "a" * 5_000_000
    with ReflectedClient(large_service.target) as client:
        requests = [client.request(id=str(i), url=url)
                    for i, url in enumerate([f"{nginx.https_url}/small.html", huge, f"{nginx.https_url}/small.html"])]
        call = client.fetch_many_packed(requests, timeout=60) if packed else client.fetch_many(requests, timeout=60)
        results = {r.id: r for r in (unpacked(call) if packed else call)}
    assert sorted(results) == ["0", "1", "2"]
    assert results["0"].status_code == results["2"].status_code == 200
    assert results["1"].error.kind == pb.FetchError.INVALID_URL and results["1"].url == huge[:65536]
