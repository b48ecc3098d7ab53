"""Redaction of URLs for anything a person or a system may read: logs, errors, stats, telemetry.

The HTTP span conventions of OpenTelemetry: "``url.full`` MUST NOT contain credentials passed via
URL in form of ``https://username:password@www.example.com/``. In such case username and password
SHOULD be redacted and attribute's value SHOULD be ``https://REDACTED:REDACTED@www.example.com/``",
and the values of the query parameters ``AWSAccessKeyId``, ``Signature``, ``sig`` and
``X-Goog-Signature`` SHOULD be replaced by ``REDACTED``. We add the other signed-URL secrets of S3
(SigV4) and GCS. Plain string work, no URL parsing: this runs once per fetch.
"""

from __future__ import annotations

__all__ = ["MAX_URL_LENGTH", "REDACTED", "SENSITIVE_QUERY_PARAMETERS", "authority_end", "redact_url"]

REDACTED = "REDACTED"
#: Query parameters whose values are replaced (compared case-insensitively).
SENSITIVE_QUERY_PARAMETERS = frozenset(
    name.lower()
    for name in (
        "AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature",  # the conventions' list
        "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "X-Goog-Credential",
    )
)
#: Longest ``url.full`` exported; longer URLs are cut (and marked with a trailing "...").
MAX_URL_LENGTH = 4096
_AUTHORITY_END = "/?#"


def authority_end(url: str, start: int) -> int:
    """Index where the authority that begins at ``start`` (just after ``://``) ends: the first
    ``/``, ``?`` or ``#`` after it, else ``len(url)``."""
    end = len(url)
    for char in _AUTHORITY_END:
        found = url.find(char, start)
        if 0 <= found < end:
            end = found
    return end


def redact_url(url: str) -> str:
    """``url`` with any ``userinfo@`` replaced by ``REDACTED:REDACTED@`` and sensitive query values
    replaced by ``REDACTED``; everything else as given."""
    if "@" in url:
        scheme_end = url.find("://")
        if scheme_end >= 0:
            start = scheme_end + 3
            at = url.rfind("@", start, authority_end(url, start))
            if at >= 0:
                url = f"{url[:start]}{REDACTED}:{REDACTED}{url[at:]}"
    query_start = url.find("?")
    if query_start >= 0:
        fragment = url.find("#", query_start)
        query_end = fragment if fragment >= 0 else len(url)
        parts = url[query_start + 1:query_end].split("&")
        changed = False
        for i, part in enumerate(parts):
            key, sep, _ = part.partition("=")
            if sep and key.lower() in SENSITIVE_QUERY_PARAMETERS:
                parts[i] = f"{key}={REDACTED}"
                changed = True
        if changed:
            url = f"{url[:query_start + 1]}{'&'.join(parts)}{url[query_end:]}"
    if len(url) > MAX_URL_LENGTH:
        url = url[:MAX_URL_LENGTH - 3] + "..."
    return url
