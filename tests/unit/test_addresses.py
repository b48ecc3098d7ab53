"""host:port addresses of --listen and --target: what gRPC would silently wrap or misread is refused
with a message that says what is wrong (fetchpool.addresses)."""

from __future__ import annotations

import pytest
from fetchpool.addresses import check_target, split_host_port
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1:50051", ("127.0.0.1", 50051)), ("localhost:1", ("localhost", 1)), ("[::1]:65535", ("::1", 65535)),
    ("[::]:50051", ("::", 50051)), ("fetchpool-headless.crawl.svc.cluster.local.:50051",
                                    ("fetchpool-headless.crawl.svc.cluster.local.", 50051)),
])
def test_host_port_forms_that_grpc_takes(address: str, expected: tuple[str, int]) -> None:
    assert split_host_port(address) == expected


@pytest.mark.parametrize(("address", "why"), [
    ("127.0.0.1:99999", "port 99999 of '127.0.0.1:99999' is out of range (1-65535)"),
    ("127.0.0.1:0", "port 0 of '127.0.0.1:0' is out of range (1-65535)"),
    ("127.0.0.1", "'127.0.0.1' has no port (HOST:PORT)"),
    ("127.0.0.1:", "the port of '127.0.0.1:' is not a number"),
    ("127.0.0.1:http", "the port of '127.0.0.1:http' is not a number"),
    ("127.0.0.1:\u0665\u0660", "the port of '127.0.0.1:\u0665\u0660' is not a number"),  # Arabic-Indic digits
    (":50051", "'' in ':50051' is not a host name or IP address"),
    ("my_host:50051", "'my_host' in 'my_host:50051' is not a host name or IP address"),
    ("::1:50051", "'::1:50051': an IPv6 address goes in brackets, as [::1]:50051"),
    ("nonsense::", "'nonsense::' is not HOST:PORT (one ':', before the port)"),
    ("[::1", "the IPv6 address in '[::1' is not closed with ']'"),
    ("[::1]", "'[::1]' has no port after the IPv6 address"),
    ("[nope]:80", "'nope' in '[nope]:80' is not an IPv6 address"),
])
def test_malformed_addresses_say_what_is_wrong(address: str, why: str) -> None:
    with pytest.raises(ValueError) as caught:
        split_host_port(address)
    assert str(caught.value).startswith(why)


def test_a_listen_address_may_ask_for_any_free_port() -> None:
    assert split_host_port("127.0.0.1:0", ephemeral=True) == ("127.0.0.1", 0)
    with pytest.raises(ValueError, match=r"out of range \(0-65535; 0 picks a free port\)"):
        split_host_port("127.0.0.1:65536", ephemeral=True)


@given(st.integers(min_value=-(10**6), max_value=10**7))
def test_only_ports_grpc_would_use_as_given_pass(port: int) -> None:
    if 1 <= port <= 65535:
        assert split_host_port(f"127.0.0.1:{port}") == ("127.0.0.1", port)
    else:
        with pytest.raises(ValueError):
            split_host_port(f"127.0.0.1:{port}")


def test_grpc_targets_are_checked_where_they_carry_host_port() -> None:
    for good in ("dns:///fetchpool-headless.crawl:50051", "dns://8.8.8.8/example.org:443", "ipv4:10.0.0.1:1,10.0.0.2:2",
                 "ipv6:[::1]:50051", "unix:/run/fetchpool.sock", "unix-abstract:fetchpool", "[::1]:50051"):
        assert check_target(good) == good
    for bad in ("dns:///nonsense::", "dns:///host:99999", "ipv4:10.0.0.1:1,10.0.0.2:70000", "host:99999", "host"):
        with pytest.raises(ValueError):
            check_target(bad)
