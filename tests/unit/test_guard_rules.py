"""The SSRF guard's allow and deny rules: an address or CIDR parses as a network or is refused, a
host pattern looks like a host name or is refused; a mistyped network never becomes a host pattern
that matches nothing (a deny rule silently off). Start-up through real flags and variables is in
tests/integration/test_serve_startup.py."""

from __future__ import annotations

import ipaddress
import re

import pytest
from fetchpool.engine.guard import TargetGuard
from fetchpool.errors import ConfigError
from hypothesis import given
from hypothesis import strategies as st

MISTYPED = ["127.0.0.1/33", "300.1.1.1/8", "10.0.0", "10.0.0.*", "10.0.0.1/", "0x7f.1", "1.2.3.4.5", "::1/129",
            "fe80::zz/64", "[::1]", "127.0.0.1:80", "10.0.0.0/8 "]
NOT_HOSTS = ["foo_bar.example", "ex ample", "bücher.example", "-web.example", "a..b", "web?.example", "[ab].example",
             "http://example.org", "*.example.org/path", ""]


@pytest.mark.parametrize("rule", MISTYPED)
def test_an_address_or_cidr_that_does_not_parse_is_refused_naming_it(rule: str) -> None:
    for allow, deny, what in [((rule,), (), "allowed"), ((), (rule,), "denied")]:
        with pytest.raises(ConfigError, match=f"^{what} target {re.escape(repr(rule))}"):
            TargetGuard(True, allow, deny)


@pytest.mark.parametrize("rule", NOT_HOSTS)
def test_a_host_pattern_must_look_like_a_host_name(rule: str) -> None:
    with pytest.raises(ConfigError, match=r"neither an address, a CIDR nor a host pattern|not a valid address"):
        TargetGuard(True, (), (rule,))


def test_valid_rules_still_work_as_before() -> None:
    guard = TargetGuard(True, ("10.20.0.0/16", "*.corp.example", "203.0.113.7", "FD00::/8", "Intranet."),
                        ("10.20.9.0/24", "*.svc.cluster.local", "kubernetes.default.svc", "127.0.0.1"))
    assert guard.address_allowed("10.20.1.1") and not guard.address_allowed("10.20.9.1")
    assert guard.address_allowed("10.9.9.9", "wiki.corp.example") and guard.address_allowed("10.9.9.9", "intranet")
    assert guard.address_allowed("fd00::1") and not guard.address_allowed("127.0.0.1")
    assert not guard.address_allowed("8.8.8.8", "api.default.svc.cluster.local")
    assert not guard.address_allowed("8.8.8.8", "kubernetes.default.svc")


@given(st.ip_addresses(), st.integers(min_value=0, max_value=200))
def test_every_prefix_is_a_network_or_refused(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                                              prefix: int) -> None:
    rule = f"{address}/{prefix}"
    if prefix <= address.max_prefixlen:
        guard = TargetGuard(True, (), (rule,))
        assert not guard.address_allowed(str(address), "any.example")  # a deny rule in force
    else:
        with pytest.raises(ConfigError, match=f"denied target {re.escape(repr(rule))} is not a valid address or CIDR"):
            TargetGuard(True, (), (rule,))


def _ends_in_a_name(name: str) -> bool:
    """The last label has a letter and is no number: "0x" and "0x1f" are hexadecimal numbers
    (WHATWG's "ends in a number"), so such rules are addresses."""
    last = name.rsplit(".", 1)[-1]
    return any(c.isalpha() for c in last) and not re.fullmatch(r"0x[0-9a-f]*", last)


@given(st.lists(st.from_regex(r"[a-z0-9*]([a-z0-9*-]{0,20}[a-z0-9*])?", fullmatch=True), min_size=1, max_size=4)
       .map(".".join).filter(_ends_in_a_name))
def test_names_ending_in_a_label_with_a_letter_are_host_patterns(name: str) -> None:
    guard = TargetGuard(True, (), (name,))
    assert not guard.address_allowed("8.8.8.8", name.replace("*", "x"))


def test_a_rule_ending_in_a_hexadecimal_label_is_an_address() -> None:
    with pytest.raises(ConfigError, match="denied target '0x' is not a valid address or CIDR"):
        TargetGuard(True, (), ("0x",))


def test_rules_in_ipv4_mapped_form_match_what_they_name() -> None:
    # A mapped address is judged as its IPv4 address: a rule written in the mapped form must be too,
    # and a deny network holds a mapped address in either form.
    guard = TargetGuard(True, ("::ffff:10.0.0.0/104",), ("::ffff:127.0.0.0/104", "64:ff9b::/96"))
    assert guard.address_allowed("10.1.2.3") and guard.address_allowed("::ffff:10.1.2.3")
    assert not guard.address_allowed("127.0.0.1", "x.example") and not guard.address_allowed("::ffff:127.0.0.1")
    everything_v6 = TargetGuard(False, (), ("::/0",))
    assert not everything_v6.address_allowed("::ffff:8.8.8.8") and everything_v6.address_allowed("8.8.8.8")


def test_nat64_well_known_prefix_is_judged_by_its_embedded_ipv4_address() -> None:
    # 64:ff9b::/96 (RFC 6052) reaches the IPv4 address in its last 32 bits through a NAT64 gateway:
    # as for ::ffff:0:0/96, the built-in rule, allow and deny rules judge that address.
    guard = TargetGuard(True, ("10.0.0.0/8",), ("10.9.0.0/16", "8.8.4.4"))
    for refused in ("64:ff9b::7f00:1", "64:ff9b::127.0.0.1", "64:ff9b::a9fe:a9fe", "64:ff9b::c0a8:101",
                    "64:ff9b::", "64:ff9b::a09:1", "64:ff9b::808:404"):
        assert not guard.address_allowed(refused, "x.example"), refused
    for allowed in ("64:ff9b::808:808", "64:ff9b::a01:203", "8.8.8.8"):
        assert guard.address_allowed(allowed, "x.example"), allowed
    # A deny rule written as the prefix holds too; the guard off still keeps the deny rules.
    assert not TargetGuard(True, (), ("64:ff9b::/96",)).address_allowed("64:ff9b::808:808")
    assert not TargetGuard(False, (), ("127.0.0.0/8",)).address_allowed("64:ff9b::7f00:1")


def test_nat64_local_use_prefix_is_refused_whole_unless_allowed() -> None:
    # 64:ff9b:1::/48 (RFC 8215) is not globally reachable, and where its IPv4 address sits depends on
    # the operator's prefix length: refused whatever it embeds, unless an allow rule names it.
    guard = TargetGuard(True, (), ())
    for address in ("64:ff9b:1::7f00:1", "64:ff9b:1::808:808", "64:ff9b:1:808:8:800::", "64:ff9b:1:ffff::1"):
        assert not guard.address_allowed(address, "x.example"), address
    assert guard.address_allowed("64:ff9b:2::808:808")  # outside the /48: an ordinary global address
    assert TargetGuard(True, ("64:ff9b:1::/48",), ()).address_allowed("64:ff9b:1::808:808")


@given(st.ip_addresses(v=4))
def test_an_ipv4_address_and_its_nat64_form_get_the_same_verdict(address: ipaddress.IPv4Address) -> None:
    guard = TargetGuard(True, ("10.0.0.0/8", "192.168.1.0/24"), ("10.9.0.0/16", "8.8.0.0/16"))
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(address))
    assert guard.address_allowed(str(nat64), "x.example") == guard.address_allowed(str(address), "x.example")
