"""What the CLI prints about a result: ``fetch -v``'s peer line says what is known (no peer when
nothing answered; over https, whether a TLS session was made when the transport does not report
its version), and a hint fits the cause its message names."""

from __future__ import annotations

import pytest
from fetchpool.render import HINTS, hint, verbose_lines
from fetchpool.v1 import fetch_pb2 as pb


def _peer_line(result: pb.FetchResult) -> str:
    return next(line for line in verbose_lines(result) if " via pool " in line)


@pytest.mark.parametrize(("result", "line"), [
    (pb.FetchResult(url="https://a.example/", remote_address="192.0.2.1:443", pool="direct", http_version="HTTP/2",
                    tls_version="TLSv1.3"), "* peer 192.0.2.1:443 via pool direct, HTTP/2, TLSv1.3, connection new"),
    # A result without a TLS version (a transport that could not read it).
    (pb.FetchResult(url="https://a.example/", remote_address="192.0.2.1:443", pool="direct", http_version="HTTP/2",
                    connection_reused=True),
     "* peer 192.0.2.1:443 via pool direct, HTTP/2, TLS version unknown, connection reused"),
    # A handshake that failed, a connection refused.
    (pb.FetchResult(url="https://a.example/", pool="direct"), "* no answer via pool direct, -, no TLS session, "
                                                               "connection new"),
    (pb.FetchResult(url="http://a.example/", pool="direct"), "* no answer via pool direct, -, no TLS, connection new"),
])
def test_the_peer_line_says_what_is_known(result: pb.FetchResult, line: str) -> None:
    assert _peer_line(result) == line


@pytest.mark.parametrize(("kind", "message", "says"), [
    ("CONNECT", "connection failed: ConnectError: Connection refused", HINTS["CONNECT"]),
    # Both transports say this of a target that closes the connection on the ClientHello.
    ("CONNECT", "the connection closed during the TLS handshake", "then closed it during the TLS handshake"),
    ("INVALID_URL", "invalid URL: the IPv6 address '[::1' is not closed with ']'", HINTS["INVALID_URL"]),
    ("INVALID_URL", "redirect to 'http://[::1': not a URL", "the target redirected to an address"),
    ("NETWORK", "connection failed: ReadError: Connection reset by peer", "why each send was repeated"),
])
def test_a_hint_fits_the_cause_the_message_names(kind: str, message: str, says: str) -> None:
    assert says in hint(kind, message)


def _redirect_lines(result: pb.FetchResult) -> list[str]:
    return [line for line in verbose_lines(result) if line.startswith("* redirect")]


def test_a_redirect_is_said_followed_or_not_once() -> None:
    location = [pb.Header(name="location", value="http://b.example/")]
    # Followed, and the next hop failed (refused by the guard, say): listed, not "not followed".
    failed_hop = pb.FetchResult(url="http://a.example/", final_url="http://a.example/", status_code=302,
                                headers=location, redirects=[pb.Redirect(url="http://a.example/", status_code=302)])
    assert _redirect_lines(failed_hop) == ["* redirect 302 from http://a.example/"]
    # Not followed (follow_redirects false, a loop, too many): said so.
    kept = pb.FetchResult(url="http://a.example/", final_url="http://a.example/", status_code=302, headers=location)
    assert _redirect_lines(kept) == ["* redirect 302 from http://a.example/ to http://b.example/, not followed"]
