"""The SSRF guard: which addresses a fetch may reach, checked after DNS, on the address connected to.

A name is resolved here, every address it resolves to is checked, and the
connection is made to a checked address (so DNS rebinding between check and
connect cannot point it elsewhere). Connections are made per origin, so every
redirect to a new origin is checked again. Through a forward proxy the proxy
resolves the name itself; the guard then checks what the name resolves to here,
before the request is sent (the proxy's own egress rules are the second line).
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import re
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import anyio
import httpcore

from fetchpool.addresses import is_global, judged_as
from fetchpool.errors import ConfigError, ErrorKind, FetchFailed

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# httpcore's SOCKET_OPTION (httpcore._backends.base), spelled out to stay off its private module.
SocketOption = tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Seconds a proxied target's verdict is remembered (saves a DNS lookup per request).
VERDICT_TTL = 30.0


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
# A host pattern: dot-separated labels of letters, digits and hyphens (RFC 1123), any of which may
# hold `*` wildcards; lower case (rules are lowered first), at most 253 characters.
_HOST_PATTERN = re.compile(r"(?=.{1,253}$)(?:[a-z0-9*](?:[a-z0-9*-]{0,61}[a-z0-9*])?\.)*"
                           r"[a-z0-9*](?:[a-z0-9*-]{0,61}[a-z0-9*])?")
# Labels that make a name an IPv4 address, after the WHATWG URL standard's "ends in a number":
# decimal, or hexadecimal with 0x.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


def _looks_like_address(rule: str) -> bool:
    """Whether ``rule`` (lowered) is meant as an address or network: it has a "/" or a ":", its last
    label is a number (no host name ends in one), or it is numbers and wildcards only ("10.0.*")."""
    labels = rule.split(".")
    return ("/" in rule or ":" in rule or bool(_NUMERIC_LABEL.fullmatch(labels[-1]))
            or (any(c.isdigit() for c in rule) and all(label.isdigit() or label == "*" for label in labels)))


def _network(rule: str) -> IPNetwork:
    """The network of an address or CIDR rule; one inside ::ffff:0:0/96 as its IPv4 network, since
    an IPv4-mapped address is judged as its IPv4 address. Raises ValueError."""
    if ":" not in rule:
        return ipaddress.IPv4Network(rule, strict=False)
    network = ipaddress.IPv6Network(rule, strict=False)
    if network.subnet_of(_MAPPED):
        return ipaddress.IPv4Network((int(network.network_address) & 0xFFFF_FFFF, network.prefixlen - 96))
    return network


def _parse_rules(entries: Iterable[str], what: str) -> tuple[tuple[IPNetwork, ...], tuple[str, ...]]:
    """Split ``entries`` into networks (CIDRs and single addresses) and host patterns.

    Raises ConfigError naming the entry for an address or CIDR that does not parse (a mistyped
    "127.0.0.1/33" taken as a host pattern would never match: a deny rule silently off) and for
    a host pattern with anything but letters, digits, hyphens, dots and ``*``.
    """
    networks: list[IPNetwork] = []
    patterns: list[str] = []
    for entry in entries:
        rule = entry.lower().rstrip(".")
        if _looks_like_address(rule):
            try:
                networks.append(_network(rule))
            except ValueError as exc:
                tail = "; wildcards match host names only: write a CIDR (10.0.0.0/24)" if "*" in rule else ""
                raise ConfigError(f"{what} target {entry!r} is not a valid address or CIDR: {exc}{tail}") from None
        elif _HOST_PATTERN.fullmatch(rule):
            patterns.append(rule)
        else:
            tail = "; write an internationalized name in its xn-- form" if not rule.isascii() else ""
            raise ConfigError(f"{what} target {entry!r} is neither an address, a CIDR nor a host pattern "
                              f"(letters, digits, hyphens and dots, with * wildcards){tail}")
    return tuple(networks), tuple(patterns)


def refusal(host: str, address: str) -> str:
    """The message of a FORBIDDEN_TARGET for ``host`` (a name or an IP literal, bracketed or
    not) refused at ``address``: an IP literal is named once ("10.0.0.1 is not an allowed
    address"), a name with what it resolves to (the CLI's hint reads the address from it)."""
    literal = host.strip("[]")
    try:
        ipaddress.ip_address(literal.split("%", 1)[0])
    except ValueError:
        return f"{host} resolves to {address}, which is not allowed"
    return f"{literal} is not an allowed address"


@dataclass(frozen=True)
class TargetGuard:
    """Decides which hosts and addresses may be fetched.

    Built-in rule: only globally routable addresses (``ipaddress``'s ``is_global``:
    no loopback, RFC 1918, link-local incl. 169.254.169.254, unique-local, multicast,
    unspecified, CGNAT, documentation or reserved ranges; IPv4-mapped IPv6 and NAT64's
    well-known prefix 64:ff9b::/96 are judged by their IPv4 address, NAT64's local-use
    64:ff9b:1::/48 is refused whole: see :mod:`fetchpool.addresses`). ``allow`` entries (CIDRs or host patterns such as
    ``*.corp.example``) are allowed anyway; ``deny`` entries are refused even then.
    ``enabled=False`` allows everything except ``deny``. Raises ConfigError for a bad rule (see
    :func:`_parse_rules`).
    """

    enabled: bool = True
    allow: Sequence[str] = ()
    deny: Sequence[str] = ()
    _allow: tuple[tuple[IPNetwork, ...], tuple[str, ...]] = field(init=False, repr=False)
    _deny: tuple[tuple[IPNetwork, ...], tuple[str, ...]] = field(init=False, repr=False)
    _verdicts: dict[tuple[str, int], float] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_allow", _parse_rules(self.allow, "allowed"))
        object.__setattr__(self, "_deny", _parse_rules(self.deny, "denied"))

    def _host_matches(self, host: str, patterns: tuple[str, ...]) -> bool:
        host = host.lower().rstrip(".")
        return any(fnmatch.fnmatchcase(host, pattern) for pattern in patterns)

    def address_allowed(self, address: str, host: str = "") -> bool:
        """Whether ``address`` (an IP literal) may be connected to for ``host``. An IPv4-mapped
        address, or one in NAT64's well-known prefix, is judged as the IPv4 address it reaches
        (:func:`fetchpool.addresses.judged_as`)."""
        given: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
        ip = judged_as(given)
        # A deny network holds a mapped address as either form (::/0 refuses ::ffff:10.0.0.1 too).
        if any(ip in net or given in net for net in self._deny[0]) or self._host_matches(host, self._deny[1]):
            return False
        if not self.enabled or is_global(given):
            return True
        return any(ip in net for net in self._allow[0]) or self._host_matches(host, self._allow[1])

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses of ``host`` that may be connected to, in resolver order.

        Raises FetchFailed(FORBIDDEN_TARGET) when any address is refused (a name that
        resolves to both a public and a private address is refused whole), and
        ``socket.gaierror`` when the name does not resolve.
        """
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        refused = [a for a in addresses if not self.address_allowed(a, host)]
        if refused:
            raise FetchFailed(ErrorKind.FORBIDDEN_TARGET, refusal(host, refused[0]))
        return addresses

    async def check(self, host: str, port: int) -> None:
        """Check a target reached through a proxy (verdicts cached for VERDICT_TTL seconds).

        Raises FetchFailed(FORBIDDEN_TARGET); a name that does not resolve here is left to the proxy.
        """
        key = (host, port)
        if self._verdicts.get(key, 0.0) > time.monotonic():
            return
        try:
            await self.resolve(host, port)
        except socket.gaierror:
            return
        if len(self._verdicts) > 10_000:
            self._verdicts.clear()
        self._verdicts[key] = time.monotonic() + VERDICT_TTL


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the guard in front of every TCP connect.

    Resolves, checks, then connects to the checked addresses in order until one answers.
    """

    def __init__(self, guard: TargetGuard, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._guard = guard
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                addresses = await self._guard.resolve(host, port)
        except socket.gaierror as exc:
            raise httpcore.ConnectError(f"{host}: {exc.strerror or exc}") from exc
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[SocketOption] | None = None
                                  ) -> httpcore.AsyncNetworkStream:
        raise FetchFailed(ErrorKind.FORBIDDEN_TARGET, "unix sockets are not fetch targets")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
