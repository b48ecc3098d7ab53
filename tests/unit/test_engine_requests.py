"""``PoolClient.new_request`` makes the request httpx's ``build_request`` makes for the engine's
fetches (the engine uses the cheaper one on every hop): same method, URL, header list in order,
body and timeouts, whatever the fetch's headers override."""

from __future__ import annotations

import httpx
from fetchpool.engine._client import PoolClient
from hypothesis import given, settings
from hypothesis import strategies as st

NAMES = st.sampled_from(["Accept", "accept-encoding", "User-Agent", "Host", "Content-Type", "X-Token",
                         "Content-Length", "Cookie", "Connection"])
VALUES = st.text(alphabet="abcXYZ019 ;=/-*", min_size=0, max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
    url=st.sampled_from(["https://example.com/", "http://127.0.0.1:8080/a?b=c", "https://[::1]:8443/x#frag",
                         "https://bücher.example/%7Euser"]),
    headers=st.lists(st.tuples(NAMES, VALUES), max_size=5),
    body=st.sampled_from([None, b"x", b"{\"a\": 1}"]),
)
def test_new_request_is_what_build_request_makes(method: str, url: str, headers: list[tuple[str, str]],
                                                  body: bytes | None) -> None:
    client = PoolClient(headers={"Accept-Encoding": "gzip, br"}, timeout=httpx.Timeout(3.0, pool=7.0))
    parsed = httpx.URL(url)
    built = client.build_request(method, parsed, headers=headers, content=body, extensions={"k": 1})
    made = client.new_request(method, parsed, headers, body, {"k": 1})
    assert (made.method, made.url, made.headers.raw) == (built.method, built.url, built.headers.raw)
    assert made.extensions == built.extensions
    assert made.read() == built.read()
