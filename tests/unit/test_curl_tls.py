"""The curl transport reads a connection's TLS version through ctypes (curl/tls.py); the engine
tests see it reported (test_engine_results, both transports, direct and through proxies)."""

from __future__ import annotations

import pycurl
from fetchpool.engine.transports.curl import tls


def test_the_easy_handle_is_found_in_the_locked_pycurl() -> None:
    # 0 would leave every curl result without a TLS version: a pycurl whose wheel no longer
    # bundles libcurl and libssl, or whose object layout moved the handle, must fail here.
    easy = pycurl.Curl()
    try:
        assert tls.easy_handle(easy) != 0
    finally:
        easy.close()


def test_a_handle_not_yet_on_a_connection_has_no_tls_version() -> None:
    easy = pycurl.Curl()
    try:
        assert tls.version(tls.easy_handle(easy)) == ""
    finally:
        easy.close()
