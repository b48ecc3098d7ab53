"""The libraries pycurl's wheel bundles (``pycurl.libs``), for the calls pycurl 7.49 does not
wrap (``streams.py``, ``tls.py``): loaded from there, so they are the very ones pycurl uses."""

from __future__ import annotations

import ctypes
import functools
import glob
import os

import pycurl


@functools.cache
def bundled(stem: str) -> ctypes.CDLL | None:
    """The bundled library whose file name starts with ``stem`` (``"libcurl"``), or None: not
    exactly one such file (a pycurl built on the system's libraries), or it does not load."""
    found = glob.glob(os.path.join(os.path.dirname(os.path.dirname(pycurl.__file__)), "pycurl.libs", f"{stem}*.so*"))
    if len(found) != 1:
        return None
    try:
        return ctypes.CDLL(found[0])
    except OSError:
        return None
