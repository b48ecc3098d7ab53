"""A result's `encoding` and `text` over real HTTP, read by callers fetchpool did not write."""

from __future__ import annotations

import hashlib

import pytest
from support import AppServer
from support.app import SAMPLE_TEXTS
from support.callers import ReflectedClient, run_node
from support.fetchpool_service import FetchpoolService

# (language, encoding the page is in, how it is declared, the encoding fetchpool must report)
CASES = [
    ("fr", "windows-1252", "none", "windows-1252"),
    ("de", "iso-8859-1", "header", "windows-1252"),  # WHATWG: the iso-8859-1 label is windows-1252
    ("ru", "koi8-r", "meta", "koi8-r"),
    ("ru", "windows-1251", "http-equiv", "windows-1251"),
    ("ja", "shift_jis", "none", "shift_jis"),
    ("ja", "euc-jp", "header", "euc-jp"),
    ("zh", "gbk", "header", "gbk"),
    ("zh", "gb18030", "none", "gb18030"),
    ("ja", "utf-8", "none", "utf-8"),
]


def _page(lang: str, encoding: str, declare: str) -> str:
    """The page /text serves, as text (tests/support/app.py)."""
    meta = {"meta": f'<meta charset="{encoding}">',
            "http-equiv": f'<meta http-equiv="Content-Type" content="text/html; charset={encoding}">'}.get(declare, "")
    return (f"<!DOCTYPE html><html><head>{meta}<title>{lang}</title></head>"
            f"<body><p>{SAMPLE_TEXTS[lang]}</p></body></html>")


def _url(app_server: AppServer, lang: str, encoding: str, declare: str) -> str:
    return f"{app_server.http_url}/text?lang={lang}&enc={encoding}&declare={declare}"


def test_encoding_and_text_as_browsers_determine_them(service: FetchpoolService, app_server: AppServer) -> None:
    with ReflectedClient(service.target) as client:
        requests = [client.request(id=str(i), url=_url(app_server, *case[:3]), include_text=True)
                    for i, case in enumerate(CASES)]
        requests.append(client.request(id="binary", url=f"{app_server.http_url}/bytes?n=300", include_text=True))
        requests.append(client.request(id="no-text", url=_url(app_server, "fr", "windows-1252", "none")))
        results = {r.id: r for r in client.fetch_many(requests)}
    for i, (lang, encoding, declare, expected) in enumerate(CASES):
        result = results[str(i)]
        assert (result.encoding, result.text) == (expected, _page(lang, encoding, declare)), CASES[i]
        assert result.body == _page(lang, encoding, declare).encode(encoding)  # the body stays as received
    assert (results["binary"].encoding, results["binary"].text) == ("", "")
    assert (results["no-text"].encoding, results["no-text"].text) == ("windows-1252", "")


async def test_grpc_js_reads_the_same_encoding_and_text(
    service: FetchpoolService, app_server: AppServer, node_clients: None
) -> None:
    requests = [{"id": str(i), "url": _url(app_server, *case[:3]), "include_text": True}
                for i, case in enumerate(CASES)]
    results, done = await run_node({"target": service.target, "rpc": "FetchMany", "requests": requests})
    assert done["code"] == 0
    by_id = {r["id"]: r for r in results}
    for i, (lang, encoding, declare, expected) in enumerate(CASES):
        page = _page(lang, encoding, declare).encode()
        assert (by_id[str(i)]["encoding"], by_id[str(i)]["text_sha256"]) == (expected, hashlib.sha256(page).hexdigest())


@pytest.mark.parametrize("lang", ["fr", "ja"])
async def test_the_fetch_client_gets_text_too(service: FetchpoolService, app_server: AppServer, lang: str) -> None:
    from fetchpool.client import FetchClient, make_request

    async with FetchClient(service.target) as client:
        url = _url(app_server, lang, "utf-8", "header")
        result = await client.fetch(make_request(url, include_text=True))
    assert result.text == _page(lang, "utf-8", "header") and result.encoding == "utf-8"
