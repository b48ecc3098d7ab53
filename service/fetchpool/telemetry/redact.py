"""Where a fetch went, for telemetry: ``server.address``/``server.port`` of a URL.

URLs themselves are redacted by :func:`fetchpool.redact.redact_url` (re-exported here).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fetchpool.redact import REDACTED, authority_end, redact_url

__all__ = ["REDACTED", "redact_url", "server_of"]


def server_of(url: str) -> tuple[str, int | None, str]:
    """``(server.address, server.port, url.scheme)`` of ``url``; ``("", None, "")`` parts when unknown.

    The port is the explicit one, else the scheme's default (80, 443). String work for the
    common case, :func:`urllib.parse.urlsplit` for anything unusual (IPv6, odd ports).
    """
    scheme_end = url.find("://")
    if scheme_end > 0:
        scheme = url[:scheme_end].lower()
        start = scheme_end + 3
        end = authority_end(url, start)
        authority = url[url.rfind("@", start, end) + 1 if "@" in url else start:end]
        host, colon, port = authority.partition(":")
        if host and "[" not in host and (not colon or port.isdigit()) and ":" not in port:
            number = int(port) if colon and port else {"http": 80, "https": 443}.get(scheme)
            if number is None or 0 < number < 65536:
                return host.lower(), number, scheme
    try:
        parts = urlsplit(url)
        hostname = parts.hostname or ""
        explicit = parts.port
    except ValueError:
        return "", None, ""
    scheme = parts.scheme.lower()
    return hostname, explicit if explicit is not None else {"http": 80, "https": 443}.get(scheme), scheme
