"""A fault-injecting TCP relay of our own, for the tests: placed between fetchpool and a target,
or between fetchpool and a proxy, it resets (RST, by SO_LINGER 0), half-closes (FIN to the client)
or holds connections at chosen stages of their exchange, and logs per connection what it did.

Stages, in the order a connection meets them (``STAGES``):

  connect   just accepted, nothing read yet
  proxy     the proxy's answer to CONNECT (HTTP) or to the SOCKS5 greeting and request
  tls       the server's first TLS flight (ServerHello, certificate): the handshake
  request   the client's first application bytes (its request, or HTTP/2 preface)
  headers   the first bytes the server sends after the request began
  body      the response further on (plain HTTP/1.1: past the end of the headers)

A ``Fault(stage, action, offset)`` fires when the stage's bytes reach ``offset`` (see
support._faults; the relay itself is support/_relay.py). A ``Plan`` says which connections get which fault (``first``,
``mix``). The relay runs in a process of its own, so its sockets (also those to the targets a
pool reaches directly) never count as sockets of the process under test.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._faults import ACTIONS, BEFORE_RESPONSE, OFFSETS, STAGES, ConnectionLog, Fault, Peer, Plan

__all__ = ["ACTIONS", "BEFORE_ANY_RESPONSE", "BEFORE_RESPONSE", "OFFSETS", "STAGES", "ConnectionLog", "Fault",
           "Plan", "Relay", "first", "injected", "mix", "summary"]

_SCRIPT = Path(__file__).with_name("_relay.py")
#: Offsets at which no response byte has reached the client yet, for the stages that need one.
BEFORE_ANY_RESPONSE: dict[str, tuple[int, int]] = {"headers": (0, 1)}


def first(fault: Fault, count: int = 1) -> Plan:
    """A plan giving the first ``count`` connections ``fault`` and leaving the others alone."""
    offsets = ((fault.stage, fault.offset, fault.offset + 1),)
    return Plan(1.0, (fault.stage,), (fault.action,), offsets, count)


def mix(
    rate: float,
    stages: Sequence[str] = STAGES,
    actions: Sequence[str] = ("reset", "half_close"),
    offsets: Mapping[str, tuple[int, int]] | None = None,
) -> Plan:
    """A plan injecting a fault into a ``rate`` fraction of connections, at a stage and with an
    action drawn from ``stages`` and ``actions``, at an offset drawn from ``offsets`` (per stage,
    [low, high) bytes; OFFSETS for the others)."""
    ranges = tuple((stage, low, high) for stage, (low, high) in (offsets or {}).items())
    return Plan(rate, tuple(stages), tuple(actions), ranges)


class Relay:
    """A relay from a loopback port of its own to ``upstream``, in a child process.

    ``with Relay(upstream, plan, seed=...) as relay:``; ``relay.url(...)``/``relay.address`` point
    clients at it; ``relay.logs()`` tells what happened per connection; ``await relay.held()``
    waits until a hold took effect; ``relay.calm()`` stops injecting into new connections.
    """

    def __init__(self, upstream: Peer, plan: Plan | None = None, *, seed: int = 0, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.plan = plan or Plan()
        self.seed = seed
        self.host = host
        self.port = 0
        self._process: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def start(self) -> Relay:
        config = {"upstream": list(self.upstream), "plan": self.plan.to_json(), "seed": self.seed, "host": self.host}
        self._process = subprocess.Popen(
            [sys.executable, str(_SCRIPT), json.dumps(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )
        self.port = self._read()["port"]
        return self

    def close(self) -> None:
        """Stop the relay (its connections, holds included, are torn down)."""
        if self._process is None:
            return
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(5)
        self._process = None

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read(self) -> Any:
        assert self._process is not None and self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the relay exited ({self._process.poll()}); see its stderr")
        return json.loads(line)

    def _ask(self, command: str) -> Any:
        with self._lock:
            assert self._process is not None and self._process.stdin is not None
            self._process.stdin.write(command + "\n")
            self._process.stdin.flush()
            return self._read()

    @property
    def address(self) -> Peer:
        return (self.host, self.port)

    def url(self, scheme: str, path: str = "") -> str:
        """``scheme://host:port`` of the relay, with ``path`` appended."""
        return f"{scheme}://{self.host}:{self.port}{path}"

    def calm(self) -> None:
        """Inject nothing into connections accepted from now on (those already open keep theirs)."""
        self._ask("calm")

    def logs(self) -> list[ConnectionLog]:
        """Every connection's log, in accept order."""
        return [ConnectionLog.from_json(entry) for entry in self._ask("logs")]

    async def held(self, count: int = 1, timeout: float = 10.0) -> list[ConnectionLog]:
        """Wait until ``count`` connections are held; returns the logs (TimeoutError if not in time)."""
        deadline = time.monotonic() + timeout
        while self._ask("held") < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} holds after {timeout} s; logs: {self.logs()}")
            await asyncio.sleep(0.01)
        return self.logs()


def injected(logs: Sequence[ConnectionLog]) -> list[ConnectionLog]:
    """The connections a fault fired on."""
    return [log for log in logs if log.injected is not None]


def summary(logs: Sequence[ConnectionLog]) -> str:
    """``"12 faults on 80 connections (9 before any response byte): tls/reset x3, ..."``."""
    fired = injected(logs)
    kinds: dict[str, int] = {}
    for log in fired:
        assert log.injected is not None
        key = f"{log.injected.stage}/{log.injected.action}"
        kinds[key] = kinds.get(key, 0) + 1
    early = sum(log.before_response for log in fired)
    detail = ", ".join(f"{key} x{count}" for key, count in sorted(kinds.items()))
    return f"{len(fired)} faults on {len(logs)} connections ({early} before any response byte): {detail}"
