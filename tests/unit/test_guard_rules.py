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


@given(st.lists(st.from_regex(r"[a-z0-9*]([a-z0-9*-]{0,20}[a-z0-9*])?", fullmatch=True), min_size=1, max_size=4)
       .map(".".join).filter(lambda name: any(c.isalpha() for c in name.rsplit(".", 1)[-1])))
def test_names_ending_in_a_label_with_a_letter_are_host_patterns(name: str) -> None:
    guard = TargetGuard(True, (), (name,))
    assert not guard.address_allowed("8.8.8.8", name.replace("*", "x"))


def test_rules_in_ipv4_mapped_form_match_what_they_name() -> None:
    # A mapped address is judged as its IPv4 address: a rule written in the mapped form must be too,
    # and a deny network holds a mapped address in either form.
    guard = TargetGuard(True, ("::ffff:10.0.0.0/104",), ("::ffff:127.0.0.0/104", "64:ff9b::/96"))
    assert guard.address_allowed("10.1.2.3") and guard.address_allowed("::ffff:10.1.2.3")
    assert not guard.address_allowed("127.0.0.1", "x.example") and not guard.address_allowed("::ffff:127.0.0.1")
    everything_v6 = TargetGuard(False, (), ("::/0",))
    assert not everything_v6.address_allowed("::ffff:8.8.8.8") and everything_v6.address_allowed("8.8.8.8")
