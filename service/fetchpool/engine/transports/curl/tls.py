"""The TLS version of a transfer's connection, for the curl transport's ``tls_version``.

libcurl hands the application the TLS session of a transfer's connection
(``CURLINFO_TLS_SSL_PTR``: OpenSSL's ``SSL *``) while the transfer is attached to it, but
pycurl 7.49 does not wrap that call. So it is made through ctypes on the libcurl and libssl
pycurl's wheel bundles (as ``streams.py`` calls ``curl_global_trace``), on the easy handle's
``CURL *``, which pycurl keeps in its object right after the Python header, its attribute dict
and its weak-reference list (``CurlObject`` in pycurl's ``src/pycurl.h``). The pointer found
there is used only if it points at a libcurl easy handle (its first field is
``CURLEASY_MAGIC_NUMBER``), so a pycurl with another layout gives no version instead of a
crash; ``tests/unit/test_curl_tls.py`` fails if the locked wheel stops giving one.

Read at a response's headers, inside libcurl's header callback: by the time a finished transfer
comes back from libcurl its connection is detached. Costs about 0.7 us per response (timed).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import pycurl

from fetchpool.engine.transports.curl.bundled import bundled

_MAGIC = 0xC0DEDBAD  # CURLEASY_MAGIC_NUMBER (lib/urldata.h)
_TLS_SSL_PTR = 0x400000 + 45  # CURLINFO_PTR + 45 (include/curl/curl.h)
_OPENSSL = 1  # CURLSSLBACKEND_OPENSSL
#: Where pycurl's CurlObject keeps the CURL *: after PyObject_HEAD, ``dict`` and ``weakreflist``.
_HANDLE_OFFSET = object.__basicsize__ + 2 * ctypes.sizeof(ctypes.c_void_p)


class _SessionInfo(ctypes.Structure):  # struct curl_tlssessioninfo
    _fields_ = [("backend", ctypes.c_int), ("internals", ctypes.c_void_p)]


@functools.cache
def _calls() -> tuple[Any, Any] | None:
    """libcurl's ``curl_easy_getinfo`` and libssl's ``SSL_get_version`` as bundled with pycurl
    (None: not found, e.g. a pycurl built against the system's libraries)."""
    getinfo = getattr(bundled("libcurl"), "curl_easy_getinfo", None)
    ssl_version = getattr(bundled("libssl"), "SSL_get_version", None)
    if getinfo is None or ssl_version is None:
        return None
    getinfo.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    getinfo.restype = ctypes.c_int
    ssl_version.argtypes = [ctypes.c_void_p]
    ssl_version.restype = ctypes.c_char_p
    return getinfo, ssl_version


def easy_handle(easy: pycurl.Curl) -> int:
    """The ``CURL *`` of ``easy`` (0: not found, or the TLS session cannot be read here)."""
    if _calls() is None:
        return 0
    handle = ctypes.c_void_p.from_address(id(easy) + _HANDLE_OFFSET).value
    if not handle or ctypes.c_uint32.from_address(handle).value != _MAGIC:
        return 0
    return int(handle)


def version(handle: int) -> str:
    """The TLS version ("TLSv1.3") of the connection the transfer of easy handle ``handle``
    (from :func:`easy_handle`, not 0) is attached to now; "" without TLS or when not told."""
    getinfo, ssl_version = _calls()  # type: ignore[misc]  # a handle was found: so were the calls
    info = ctypes.POINTER(_SessionInfo)()
    if getinfo(handle, _TLS_SSL_PTR, ctypes.byref(info)) != 0 or not info:
        return ""
    session = info.contents
    if session.backend != _OPENSSL or not session.internals:
        return ""
    return (ssl_version(session.internals) or b"").decode("ascii", "replace")
