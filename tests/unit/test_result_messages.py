"""Result messages: parts that fit the caller's limit and join back exactly, unary TOO_LARGE, and
every engine-side field converted (server/parts.py, server/convert.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fetchpool.client import reassemble
from fetchpool.engine import FetchSpec, Outcome
from fetchpool.errors import ErrorKind
from fetchpool.server import parts
from fetchpool.server.convert import result_to_proto, spec_from_proto
from fetchpool.v1 import fetch_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

LIMIT = 1024


@settings(max_examples=200)
@given(body=st.binary(max_size=5000), text=st.text(max_size=2000), headers=st.integers(0, 20),
       request_id=st.text(max_size=100))
def test_parts_fit_the_limit_and_join_back(body: bytes, text: str, headers: int, request_id: str) -> None:
    result = pb.FetchResult(id=request_id, index=7, status_code=200, body=body, text=text, body_size=len(body),
                            headers=[pb.Header(name=f"x-{i}", value="v" * 10) for i in range(headers)])
    whole = result.SerializeToString()
    messages = parts.split(result, LIMIT)
    assert all(m.ByteSize() <= LIMIT for m in messages)
    assert [m.part for m in messages] == list(range(len(messages)))
    assert [m.more_parts for m in messages] == [True] * (len(messages) - 1) + [False]
    assert all((m.id, m.index) == (request_id, 7) for m in messages)
    head = messages[0]
    joined = pb.FetchResult()
    joined.CopyFrom(head)
    joined.body = b"".join(m.body for m in messages)
    joined.text = "".join(m.text for m in messages)
    joined.more_parts = False
    assert joined == pb.FetchResult.FromString(whole)
    assert all(m.status_code == 0 and not m.headers for m in messages[1:])


async def _unpacked(messages: list[pb.FetchResults]) -> list[pb.FetchResult]:
    async def each() -> AsyncIterator[pb.FetchResult]:
        for message in messages:
            for result in message.results:
                yield result

    return [result async for result in reassemble(each())]


# Sizes around _SMALL (16 KiB, measured exactly below it, bounded above) and limits a few results fill.
@settings(max_examples=150, deadline=None)
@given(results=st.lists(st.tuples(st.integers(0, 90_000), st.integers(0, 3000), st.sampled_from([30_000, 64_000])),
                        max_size=25))
def test_packed_messages_fit_each_of_their_results_limits_and_unpack_to_the_results(
    results: list[tuple[int, int, int]],
) -> None:
    given_results = [(pb.FetchResult(id=f"r{i}", index=i, status_code=200, body=b"b" * body, text="t" * text,
                                     body_size=body), limit) for i, (body, text, limit) in enumerate(results)]
    originals = [result.SerializeToString() for result, _ in given_results]
    messages = parts.pack(given_results)
    for message in messages:
        assert message.results, "an empty message"
        assert message.ByteSize() <= min(results[r.index][2] for r in message.results)
    assert [r.SerializeToString() for r in asyncio.run(_unpacked(messages))] == originals


def test_small_results_ready_together_go_in_one_message() -> None:
    results = [(pb.FetchResult(id=str(i), index=i, body=b"x" * 2048, body_size=2048), 4 << 20) for i in range(100)]
    [message] = parts.pack(results)
    assert [r.index for r in message.results] == list(range(100))


def test_message_limit_defaults_to_grpc_s_4_mib_within_the_server_ceiling() -> None:
    assert parts.message_limit(0, 64 << 20) == 4 << 20
    assert parts.message_limit(32 << 20, 64 << 20) == 32 << 20
    assert parts.message_limit(1 << 30, 64 << 20) == 64 << 20
    assert parts.message_limit(1, 64 << 20) == parts.MIN_MESSAGE_BYTES


def test_unary_results_over_the_limit_keep_their_head_and_name_the_fix() -> None:
    small = pb.FetchResult(status_code=200, body=b"x" * 10)
    assert parts.too_large_for_fetch(small, LIMIT) is small
    big = pb.FetchResult(status_code=200, body=b"x" * 5000, body_size=5000, text="y" * 10,
                         headers=[pb.Header(name="content-type", value="text/plain")])
    answer = parts.too_large_for_fetch(big, LIMIT)
    assert (answer.status_code, answer.body, answer.text, answer.body_size) == (200, b"", "", 5000)
    assert answer.error.kind == pb.FetchError.TOO_LARGE and "FetchStream" in answer.error.message
    assert len(answer.headers) == 1


def test_every_engine_field_is_converted() -> None:
    outcome = Outcome(
        url="http://a/", final_url="https://b/", status_code=200, body="é".encode("cp1252"),
        headers=[("Content-Type", "text/plain; charset=windows-1252"), ("Content-Encoding", "gzip")],
        redirects=[("http://a/", 301), ("https://a/", 302)], remote_address="192.0.2.1:443",
        tls_version="TLSv1.3", content_decoded=True, attempts=3,
        retry_reasons=["NETWORK: connection failed: ReadError: Connection reset by peer", "status 503"],
    )
    result = result_to_proto(outcome, "r", 3, include_text=True)
    assert [(r.url, r.status_code) for r in result.redirects] == [("http://a/", 301), ("https://a/", 302)]
    assert (result.remote_address, result.tls_version, result.content_decoded) == ("192.0.2.1:443", "TLSv1.3", True)
    assert (result.encoding, result.text, result.body_size) == ("windows-1252", "é", 1)
    assert result.attempts == 3 and list(result.retry_reasons) == outcome.retry_reasons
    assert result_to_proto(outcome, "r", 3).text == ""  # text only when asked for
    failed = result_to_proto(Outcome(url="http://a/", error_kind=ErrorKind.DNS, error_message="no"), "r", 0)
    assert failed.encoding == "" and failed.error.kind == pb.FetchError.DNS
    spec = spec_from_proto(pb.FetchRequest(url="http://a/", session_key="s", keep_cookies=True))
    assert spec == FetchSpec(url="http://a/", session_key="s", keep_cookies=True)
