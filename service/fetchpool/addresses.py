"""``host:port`` addresses of the gRPC side: the service's ``--listen`` and the CLI's ``--target``.

gRPC core takes the port modulo 65536 (``127.0.0.1:99999`` listens on 34463) and reports a
malformed address only when it fails to resolve it, so both are checked here first, with
Go's ``net.SplitHostPort`` rules: an IPv6 literal goes in brackets (``[::1]:50051``).
"""

from __future__ import annotations

import ipaddress
import re

__all__ = ["check_target", "is_global", "judged_as", "split_host_port"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: NAT64's well-known prefix (RFC 6052 §2.1): its addresses are the IPv4 address in their last
#: 32 bits, which a NAT64 gateway on the path connects to.
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
#: NAT64's local-use prefix (RFC 8215): not globally reachable (IANA's special-purpose registry),
#: and where the IPv4 address sits in it depends on the prefix length its operator chose (/48 to
#: /96, RFC 6052 §2.2), so it cannot be read from the address alone.
NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")

# A host name: dot-separated labels of letters, digits and hyphens (RFC 1123), an optional final dot.
_HOST_NAME = re.compile(r"(?=.{1,253}\.?$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                        r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?")
#: gRPC name-resolver schemes whose addresses are not ``host:port`` (left to gRPC as given).
OTHER_SCHEMES = ("unix", "unix-abstract", "vsock", "xds", "google-c2p")


def split_host_port(address: str, *, ephemeral: bool = False) -> tuple[str, int]:
    """``(host, port)`` of ``"host:port"`` or ``"[IPv6]:port"``; the host is a host name, an IPv4
    address or a bracketed IPv6 address (returned without its brackets), the port 1-65535, or
    0 (any free port) when ``ephemeral``.

    Raises ValueError saying what is wrong with ``address``.
    """
    if address.startswith("["):
        host, closed, rest = address[1:].partition("]")
        if not closed:
            raise ValueError(f"the IPv6 address in {address!r} is not closed with ']'")
        if not rest.startswith(":"):
            raise ValueError(f"{address!r} has no port after the IPv6 address (HOST:PORT, as [::1]:50051)")
        port = rest[1:]
        if not _ipv6(host):
            raise ValueError(f"{host!r} in {address!r} is not an IPv6 address")
    else:
        host, colon, port = address.rpartition(":")
        if not colon:
            raise ValueError(f"{address!r} has no port (HOST:PORT)")
        if ":" in host:
            raise ValueError(f"{address!r}: an IPv6 address goes in brackets, as [::1]:50051" if _ipv6(host)
                             else f"{address!r} is not HOST:PORT (one ':', before the port)")
        if not _HOST_NAME.fullmatch(host):
            raise ValueError(f"{host!r} in {address!r} is not a host name or IP address")
    lowest = 0 if ephemeral else 1
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"the port of {address!r} is not a number (HOST:PORT)")
    if not lowest <= int(port) <= 65535:
        free = "; 0 picks a free port" if ephemeral else ""
        raise ValueError(f"port {int(port)} of {address!r} is out of range ({lowest}-65535{free})")
    return host, int(port)


def _ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def check_target(target: str) -> str:
    """``target`` when it is a gRPC target a channel can use: ``host:port``, ``dns:[//authority/]host:port``,
    ``ipv4:``/``ipv6:`` lists of addresses, or a scheme of :data:`OTHER_SCHEMES` (not checked).

    Raises ValueError saying what is wrong (see :func:`split_host_port`).
    """
    scheme, colon, rest = target.partition(":")
    if colon and scheme in OTHER_SCHEMES:
        return target
    if colon and scheme == "dns":
        if rest.startswith("//"):  # dns://authority/host:port: the authority is the DNS server
            rest = rest[2:].partition("/")[2]
        split_host_port(rest)
    elif colon and scheme in ("ipv4", "ipv6"):
        for address in rest.split(","):
            split_host_port(address)
    else:
        split_host_port(target)
    return target


def judged_as(address: IPAddress) -> IPAddress:
    """The address a connection to ``address`` reaches, for the SSRF guard: the IPv4 address of an
    IPv4-mapped address (``::ffff:127.0.0.1``) or of one in NAT64's well-known prefix
    (``64:ff9b::7f00:1``); ``address`` itself otherwise."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in NAT64_WELL_KNOWN:
            return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    return address


def is_global(address: IPAddress) -> bool:
    """Whether ``address`` is globally reachable: ``ipaddress``'s ``is_global`` of what it is
    :func:`judged_as`, and never in NAT64's local-use prefix (Python releases without the
    CVE-2024-4032 fix, 3.11.7 among them, count that prefix as global)."""
    judged = judged_as(address)
    return judged.is_global and judged not in NAT64_LOCAL_USE
