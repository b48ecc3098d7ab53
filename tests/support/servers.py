"""Launchers for the real servers the tests talk to, all on 127.0.0.1 ports from free_port():
nginx (static origin, HTTP/1.1 and TLS with HTTP/2), tinyproxy and squid (forward proxies), and
AppServer (tests/support/app.py under hypercorn, HTTP/1.1 and TLS with h2).

Each is a ServerProcess: ``start()``/``stop()``/``kill()``/``restart()`` or ``with Nginx(...) as n:``;
ports stay the same across restarts.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .certs import CertPair, Certs
from .process import ServerProcess, find_binary, free_port

LOOPBACK = "127.0.0.1"
APP_MODULE = Path(__file__).with_name("app.py")

# (JSON key, nginx variable, is a number: written unquoted so json.loads gives int/float).
_ACCESS_LOG_FIELDS: tuple[tuple[str, str, bool], ...] = (
    ("msec", "$msec", True),
    ("connection", "$connection", True),
    ("connection_requests", "$connection_requests", True),
    ("server_protocol", "$server_protocol", False),
    ("request_method", "$request_method", False),
    ("request_uri", "$request_uri", False),
    ("status", "$status", True),
    ("body_bytes_sent", "$body_bytes_sent", True),
    ("request_time", "$request_time", True),
    ("server_port", "$server_port", True),
    ("remote_addr", "$remote_addr", False),
    ("remote_port", "$remote_port", True),
    ("ssl_protocol", "$ssl_protocol", False),
    ("http_user_agent", "$http_user_agent", False),
)


def _access_log_format() -> str:
    fields = ",".join(
        f'"{key}":{var}' if numeric else f'"{key}":"{var}"' for key, var, numeric in _ACCESS_LOG_FIELDS
    )
    return "{" + fields + "}"


@functools.cache
def nginx_version() -> tuple[int, int, int]:
    """The installed nginx's version. Raises MissingBinaryError, or RuntimeError if unparsable."""
    result = subprocess.run(
        [find_binary("nginx"), "-v"], capture_output=True, text=True, timeout=10, check=False
    )
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", result.stderr + result.stdout)
    if match is None:
        raise RuntimeError(f"cannot parse nginx -v output: {result.stderr!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def concurrency_peaks(entries: Iterable[Mapping[str, Any]]) -> tuple[int, dict[int, int]]:
    """The most requests nginx served at once, over all ``entries`` and per ``$connection`` id.

    A request's span is its log time (``msec``) less its ``request_time``, both in seconds with
    millisecond resolution: counted in whole milliseconds, because in floats a start derived by
    subtraction lands a hair before an end logged in the same millisecond about one time in eight,
    and counted one request too many. Ends sort before starts at the same millisecond.
    """
    spans: dict[int, list[tuple[int, int]]] = {}
    for entry in entries:
        end = round(entry["msec"] * 1000)
        spans.setdefault(entry["connection"], []).append((end - round(entry["request_time"] * 1000), end))

    def peak(intervals: Iterable[tuple[int, int]]) -> int:
        events = sorted(step for start, end in intervals for step in ((start, 1), (end, -1)))
        level = top = 0
        for _, change in events:
            level += change
            top = max(top, level)
        return top

    return peak(span for s in spans.values() for span in s), {c: peak(s) for c, s in spans.items()}


def _read_json_lines(path: Path, since: int) -> list[dict[str, Any]]:
    try:
        with path.open("rb") as log:
            log.seek(since)
            data = log.read()
    except FileNotFoundError:
        return []
    # A line still being written has no newline yet: leave it for the next read.
    complete = data[: data.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def _read_text(path: Path, since: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(since)
            return log.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


class _PlainAndTls:
    """A server with a plain HTTP/1.1 listener and a TLS one (HTTP/2 or HTTP/1.1 by ALPN) on loopback."""

    http_port: int
    https_port: int

    @property
    def http_url(self) -> str:
        """Base URL of the plain HTTP/1.1 listener, no trailing slash."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def https_url(self) -> str:
        """Base URL of the TLS listener (HTTP/2 or HTTP/1.1 by ALPN), no trailing slash."""
        return f"https://{LOOPBACK}:{self.https_port}"

    def ports(self) -> Sequence[int]:
        return (self.http_port, self.https_port)


class Nginx(_PlainAndTls, ServerProcess):
    """nginx serving ``root`` on a plain HTTP/1.1 port and a TLS port with HTTP/2 (ALPN h2, http/1.1).

    ``aliases`` maps URL prefixes to directories ({"/doc/": Path(...)}); ``extra_locations`` is raw
    config placed in the server block (both listeners). Times are in seconds. One worker process,
    so ``$connection`` ids in the access log are unique per nginx run (they restart at 1).
    """

    name = "nginx"

    def __init__(
        self,
        root: Path,
        certs: Certs,
        *,
        tls_cert: CertPair | None = None,
        aliases: Mapping[str, Path] | None = None,
        keepalive_timeout: float = 75.0,
        keepalive_requests: int = 1000,
        http2_max_concurrent_streams: int = 128,
        worker_connections: int = 4096,
        extra_locations: str = "",
        workdir: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        self.root = root
        self.certs = certs
        self.tls_cert = tls_cert or certs.server
        self.aliases = dict(aliases or {})
        self.keepalive_timeout = keepalive_timeout
        self.keepalive_requests = keepalive_requests
        self.http2_max_concurrent_streams = http2_max_concurrent_streams
        self.worker_connections = worker_connections
        self.extra_locations = extra_locations
        self.http_port = free_port()
        self.https_port = free_port()
        self.conf_path = self.workdir / "nginx.conf"
        self.access_log_path = self.workdir / "access.log"
        self.error_log_path = self.workdir / "error.log"

    def _command(self) -> list[str]:
        # -e: nginx would otherwise open its compiled-in error log before reading our config.
        return [
            find_binary("nginx"),
            "-p",
            str(self.workdir),
            "-c",
            str(self.conf_path),
            "-e",
            str(self.error_log_path),
        ]

    def _log_paths(self) -> Sequence[Path]:
        return (self.error_log_path,)

    def _write_config(self) -> None:
        work = self.workdir
        # nginx 1.25.1 replaced `listen ... http2` with the `http2 on;` directive.
        new_http2 = nginx_version() >= (1, 25, 1)
        tls_listen = f"listen {LOOPBACK}:{self.https_port} ssl{'' if new_http2 else ' http2'};"
        aliases = "".join(
            f"        location {prefix} {{ alias {path}/; }}\n" for prefix, path in self.aliases.items()
        )
        temp_paths = "".join(
            f"    {kind}_temp_path {work / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        # As root the workers would switch to nobody and could not read a 0700 temp dir.
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf_path.write_text(
            f"""# generated by tests/support/servers.py
{user}daemon off;
worker_processes 1;
worker_rlimit_nofile {self.worker_connections * 2 + 64};
pid {work / "nginx.pid"};
error_log {self.error_log_path} info;
events {{ worker_connections {self.worker_connections}; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
{temp_paths}    log_format fetchpool_json escape=json '{_access_log_format()}';
    access_log {self.access_log_path} fetchpool_json;
    sendfile on;
    server_tokens off;
    keepalive_timeout {_duration(self.keepalive_timeout)};
    keepalive_requests {self.keepalive_requests};
    http2_max_concurrent_streams {self.http2_max_concurrent_streams};
    server {{
        listen {LOOPBACK}:{self.http_port};
        {tls_listen}
        {"http2 on;" if new_http2 else ""}
        server_name localhost;
        ssl_certificate {self.tls_cert.cert};
        ssl_certificate_key {self.tls_cert.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {self.root};
{aliases}{self.extra_locations}
    }}
}}
"""
        )

    def log_offset(self) -> int:
        """The access log's size in bytes now: pass it as ``since`` to see only later requests."""
        return _file_size(self.access_log_path)

    def access_log(self, since: int = 0, min_entries: int = 0, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Access log entries written after byte offset ``since``, as dicts (see _ACCESS_LOG_FIELDS).

        nginx logs a request just after sending its response, so a client can see the response
        first: with ``min_entries``, poll up to ``timeout`` seconds for that many entries and
        return what there is then (never raises for too few).
        """
        deadline = time.monotonic() + timeout
        entries = _read_json_lines(self.access_log_path, since)
        while len(entries) < min_entries and time.monotonic() < deadline:
            time.sleep(0.02)
            entries = _read_json_lines(self.access_log_path, since)
        return entries

    def distinct_connections(self, since: int = 0, min_entries: int = 0, port: int | None = None) -> set[int]:
        """The ``$connection`` ids of access log entries after ``since`` (only ``port``'s if given)."""
        entries = self.access_log(since, min_entries)
        return {entry["connection"] for entry in entries if port is None or entry["server_port"] == port}


class Tinyproxy(ServerProcess):
    """tinyproxy as a forward proxy on 127.0.0.1 (HTTP and CONNECT), allowing loopback clients.

    ``allow_connect_ports``: the ports CONNECT may reach (None or empty: any port, tinyproxy's
    rule). ``basic_auth``: (user, password) required from clients. ``idle_timeout`` in seconds.
    """

    name = "tinyproxy"

    def __init__(
        self,
        *,
        allow_connect_ports: Iterable[int] | None = None,
        basic_auth: tuple[str, str] | None = None,
        max_clients: int = 200,
        idle_timeout: int = 600,
        log_level: str = "Connect",
        port: int | None = None,
        workdir: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        self.allow_connect_ports = sorted(set(allow_connect_ports or ()))
        self.basic_auth = basic_auth
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.log_level = log_level
        self.port = port or free_port()
        self.conf_path = self.workdir / "tinyproxy.conf"
        self.log_path = self.workdir / "tinyproxy.log"

    @property
    def url(self) -> str:
        """The proxy URL, with user:password@ when basic_auth is set."""
        auth = f"{self.basic_auth[0]}:{self.basic_auth[1]}@" if self.basic_auth else ""
        return f"http://{auth}{LOOPBACK}:{self.port}"

    def ports(self) -> Sequence[int]:
        return (self.port,)

    def _command(self) -> list[str]:
        return [find_binary("tinyproxy"), "-d", "-c", str(self.conf_path)]

    def _log_paths(self) -> Sequence[Path]:
        return (self.log_path,)

    def _write_config(self) -> None:
        lines = [
            f"Port {self.port}",
            f"Listen {LOOPBACK}",
            f"Allow {LOOPBACK}",
            f"Timeout {self.idle_timeout}",
            f"MaxClients {self.max_clients}",
            f'LogFile "{self.log_path}"',
            f"LogLevel {self.log_level}",
            f'PidFile "{self.workdir / "tinyproxy.pid"}"',
            *(f"ConnectPort {port}" for port in self.allow_connect_ports),
        ]
        if self.basic_auth:
            lines.append(f"BasicAuth {self.basic_auth[0]} {self.basic_auth[1]}")
        self.conf_path.write_text("\n".join(lines) + "\n")

    def log_offset(self) -> int:
        """The log's size in bytes now: pass it as ``since`` to log_text to see only later lines."""
        return _file_size(self.log_path)

    def log_text(self, since: int = 0) -> str:
        """The log from byte offset ``since`` (all runs of this object append to one file)."""
        return _read_text(self.log_path, since)


class Microsocks(ServerProcess):
    """microsocks, a SOCKS5 proxy on 127.0.0.1; ``auth`` = (user, password) makes it require them."""

    name = "microsocks"

    def __init__(self, *, auth: tuple[str, str] | None = None, port: int | None = None) -> None:
        super().__init__()
        self.auth = auth
        self.port = port or free_port()

    @property
    def url(self) -> str:
        """``socks5://[user:password@]127.0.0.1:port``."""
        credentials = f"{self.auth[0]}:{self.auth[1]}@" if self.auth else ""
        return f"socks5://{credentials}{LOOPBACK}:{self.port}"

    def ports(self) -> Sequence[int]:
        return (self.port,)

    def _command(self) -> list[str]:
        auth = ["-u", self.auth[0], "-P", self.auth[1]] if self.auth else []
        return [find_binary("microsocks"), "-i", LOOPBACK, "-p", str(self.port), *auth]


class Squid(ServerProcess):
    """squid as a non-caching forward proxy on 127.0.0.1, allowing loopback clients only.

    ``allow_connect_ports``: the ports CONNECT may reach (None: any port). DNS is pointed at
    127.0.0.1 so squid can never query outside. Run as root, squid drops to the ``proxy`` user,
    so its files live in a temp dir of its own that user may write (removed by ``close()``).
    """

    name = "squid"

    def __init__(self, *, allow_connect_ports: Iterable[int] | None = None, port: int | None = None) -> None:
        super().__init__(None)
        self.allow_connect_ports = None if allow_connect_ports is None else sorted(set(allow_connect_ports))
        self.port = port or free_port()
        # Names squid's shared-memory segments (/dev/shm/<name>-*), so instances do not collide.
        self.service_name = f"fetchpool{self.port}"
        self.conf_path = self.workdir / "squid.conf"
        self.access_log_path = self.workdir / "access.log"
        self.cache_log_path = self.workdir / "cache.log"
        self._effective_user = "proxy" if os.geteuid() == 0 else None
        if self._effective_user:
            entry = pwd.getpwnam(self._effective_user)
            os.chown(self.workdir, entry.pw_uid, entry.pw_gid)

    @property
    def url(self) -> str:
        """The proxy URL."""
        return f"http://{LOOPBACK}:{self.port}"

    def ports(self) -> Sequence[int]:
        return (self.port,)

    def _command(self) -> list[str]:
        return [find_binary("squid"), "-N", "-n", self.service_name, "-f", str(self.conf_path)]

    def _log_paths(self) -> Sequence[Path]:
        return (self.cache_log_path,)

    def _after_exit(self) -> None:
        for segment in Path("/dev/shm").glob(f"{self.service_name}-*"):
            segment.unlink(missing_ok=True)

    def _write_config(self) -> None:
        work = self.workdir
        lines = [
            f"http_port {LOOPBACK}:{self.port}",
            *([f"cache_effective_user {self._effective_user}"] if self._effective_user else []),
            f"pid_filename {work / 'squid.pid'}",
            f"cache_log {self.cache_log_path}",
            f"access_log stdio:{self.access_log_path}",
            "cache_store_log none",
            f"coredump_dir {work}",
            "cache deny all",
            "cache_mem 8 MB",
            "netdb_filename none",
            "pinger_enable off",
            "icp_port 0",
            "htcp_port 0",
            "dns_nameservers 127.0.0.1",
            "visible_hostname fetchpool-test",
            # squid waits 30 s for open connections on SIGTERM by default.
            "shutdown_lifetime 0 seconds",
            "acl loopback src 127.0.0.1/32 ::1",
            "acl connect_method method CONNECT",
        ]
        if self.allow_connect_ports is not None:
            ports = " ".join(str(port) for port in self.allow_connect_ports) or "0"
            lines += [f"acl connect_ports port {ports}", "http_access deny connect_method !connect_ports"]
        lines += ["http_access allow loopback", "http_access deny all"]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def log_offset(self) -> int:
        """The access log's size in bytes now: pass it as ``since`` to see only later lines."""
        return _file_size(self.access_log_path)

    def access_log_text(self, since: int = 0) -> str:
        """The access log from byte offset ``since``, squid's native format: time, elapsed ms,
        client, result/status, bytes, method, URL, user, hierarchy/peer, type."""
        return _read_text(self.access_log_path, since)


class AppServer(_PlainAndTls, ServerProcess):
    """tests/support/app.py under hypercorn: plain HTTP/1.1 on ``http_port``, TLS with ALPN h2 and
    http/1.1 on ``https_port``, certificate from ``certs``. ``keep_alive``: idle timeout, whole seconds.
    """

    name = "app"

    def __init__(
        self,
        certs: Certs,
        *,
        tls_cert: CertPair | None = None,
        keep_alive: int = 5,
        workdir: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        self.certs = certs
        self.tls_cert = tls_cert or certs.server
        self.keep_alive = keep_alive
        self.http_port = free_port()
        self.https_port = free_port()
        self.access_log_path = self.workdir / "access.log"
        self.error_log_path = self.workdir / "error.log"

    def _log_paths(self) -> Sequence[Path]:
        return (self.error_log_path,)

    def _command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "hypercorn",
            # 0 workers: serve in this one process, so signals reach the server itself.
            "--workers",
            "0",
            "--bind",
            f"{LOOPBACK}:{self.https_port}",
            "--insecure-bind",
            f"{LOOPBACK}:{self.http_port}",
            "--certfile",
            str(self.tls_cert.cert),
            "--keyfile",
            str(self.tls_cert.key),
            "--keep-alive",
            str(self.keep_alive),
            "--graceful-timeout",
            "1",
            "--access-logfile",
            str(self.access_log_path),
            "--error-logfile",
            str(self.error_log_path),
            f"{APP_MODULE}:app",
        ]

    def log_offset(self) -> int:
        """The access log's size in bytes now: pass it as ``since`` to see only later lines."""
        return _file_size(self.access_log_path)

    def access_log_text(self, since: int = 0) -> str:
        """hypercorn's access log from byte offset ``since`` (one line per request)."""
        return _read_text(self.access_log_path, since)
