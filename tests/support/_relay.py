"""The fault-injecting TCP relay of support.chaos, run by it as a script in a process of its own
(``python _relay.py CONFIG``), so none of its sockets is a socket of the process under test.

From a loopback port of its own to one upstream, each accepted connection gets the fault its plan
draws for it (see _faults). A hold stops the stage's direction only (a held request blocks the
client's writes once the socket buffers fill; a held response leaves the client waiting) until
the client goes away, the relay stops, or MAX_HOLD_S passes.

It answers one JSON line per command line on stdin: ``logs`` (every connection's log), ``held``
(how many connections were held), ``calm`` (no fault for connections accepted from now on);
the end of stdin stops it. Standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import socket
import struct
import sys
import threading
from collections.abc import Coroutine
from typing import Any

from _faults import CHUNK, ConnectionLog, Fault, Peer, Plan, Tracker

#: A held connection is closed after this many seconds whatever happens.
MAX_HOLD_S = 60.0


class RelayCore:
    """The relay, in a thread with its own event loop: from a loopback port of its own to
    ``upstream``; ``plan`` picks each connection's fault."""

    def __init__(self, upstream: Peer, plan: Plan, *, seed: int = 0, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.plan = plan
        self.seed = seed
        self.host = host
        self._lock = threading.Lock()
        self._logs: list[ConnectionLog] = []
        self._held = 0
        self._counter = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"relay-{upstream[1]}", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> RelayCore:
        self._thread.start()
        self._run(self._start())
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0, limit=CHUNK)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Stop listening and tear down every connection (holds included)."""

        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._run(stop(), timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> RelayCore:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- what tests read -------------------------------------------------------------------

    def calm(self) -> None:
        """Inject nothing into connections accepted from now on (those already open keep theirs)."""
        self.plan = Plan()

    def logs(self) -> list[ConnectionLog]:
        """A copy of every connection's log, in accept order."""
        with self._lock:
            return [dataclasses.replace(log) for log in self._logs]

    def held(self) -> int:
        """How many connections are held now or were."""
        with self._lock:
            return self._held

    # -- one connection --------------------------------------------------------------------

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        index = next(self._counter)
        peername = client_writer.get_extra_info("peername")
        fault = self.plan.fault(index, self.seed)
        log = ConnectionLog(index=index, client=(peername[0], peername[1]), planned=fault)
        with self._lock:
            self._logs.append(log)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            if fault is not None and fault.stage == "connect":
                await self._act(log, fault, client_writer, None, client_reader)
                return
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream, limit=CHUNK)
            local = upstream_writer.get_extra_info("sockname")
            with self._lock:
                log.upstream_local = (local[0], local[1])
            tracker = Tracker(log, fault)
            await self._pump(log, tracker, client_reader, client_writer, upstream_reader, upstream_writer)
        except (OSError, asyncio.IncompleteReadError) as exc:
            with self._lock:
                log.error = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            # Only close() cancels a connection's task; returning keeps asyncio's callback quiet.
            _abort(client_writer)
            if upstream_writer is not None:
                _abort(upstream_writer)
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None and not writer.is_closing():
                    writer.close()
            with self._lock:
                log.closed = True
            self._tasks.discard(task)

    async def _pump(
        self,
        log: ConnectionLog,
        tracker: Tracker,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
    ) -> None:
        fired: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, from_client: bool) -> None:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    if writer.can_write_eof():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                    return
                with self._lock:
                    count, fire = (tracker.client_bytes if from_client else tracker.server_bytes)(data)
                    if from_client:
                        log.to_upstream += count
                    else:
                        log.to_client += count
                if count:
                    writer.write(data[:count])
                    await writer.drain()
                if fire:
                    if not fired.done():
                        fired.set_result("c2s" if from_client else "s2c")
                    return

        c2s = asyncio.create_task(pump(client_reader, upstream_writer, True))
        s2c = asyncio.create_task(pump(upstream_reader, client_writer, False))
        try:
            pending: set[asyncio.Future[Any]] = {c2s, s2c, fired}
            # Ends when both directions ended, or the fault fired.
            while not fired.done() and not (c2s.done() and s2c.done()):
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if fired.done():
                fault = tracker.fault
                assert fault is not None
                if fault.action != "hold":
                    for task in (c2s, s2c):
                        task.cancel()
                    await asyncio.gather(c2s, s2c, return_exceptions=True)
                with self._lock:
                    log.injected = dataclasses.replace(fault, offset=tracker.fired_offset)
                await self._act(log, fault, client_writer, upstream_writer, client_reader, keep=(c2s, s2c))
        finally:
            for task in (c2s, s2c):
                task.cancel()
            await asyncio.gather(c2s, s2c, return_exceptions=True)

    async def _act(
        self,
        log: ConnectionLog,
        fault: Fault,
        client_writer: asyncio.StreamWriter,
        upstream_writer: asyncio.StreamWriter | None,
        client_reader: asyncio.StreamReader,
        keep: tuple[asyncio.Task[None], ...] = (),
    ) -> None:
        if log.injected is None:
            with self._lock:
                log.injected = fault
        if fault.action == "reset":
            _abort(client_writer)
            if upstream_writer is not None:
                _abort(upstream_writer)
            return
        if fault.action == "half_close":
            # FIN to the client; the upstream goes away; what the client still sends is read
            # and dropped until it closes (bounded).
            if upstream_writer is not None:
                _abort(upstream_writer)
            with contextlib.suppress(OSError):
                client_writer.write_eof()
            with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
                async with asyncio.timeout(MAX_HOLD_S):
                    while await client_reader.read(CHUNK):
                        pass
            return
        # hold: the other direction keeps flowing (the pump still running); this one stops.
        with self._lock:
            self._held += 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(MAX_HOLD_S):
                others = [task for task in keep if not task.done()]
                if others:
                    await asyncio.wait(others)
                while not client_writer.is_closing():
                    await asyncio.sleep(0.05)
                    if client_reader.at_eof():
                        break


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with an RST: SO_LINGER on, 0 seconds."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()




def main(argv: list[str]) -> None:
    """Run a relay configured by ``argv[1]`` (JSON: upstream, plan, seed, host) until stdin ends."""
    config = json.loads(argv[1])
    core = RelayCore((config["upstream"][0], config["upstream"][1]), Plan.from_json(config["plan"]),
                     seed=config["seed"], host=config["host"])
    core.start()
    try:
        print(json.dumps({"port": core.port}), flush=True)
        for line in sys.stdin:  # ends when the parent closes stdin
            command = line.strip()
            if command == "logs":
                reply: Any = [log.to_json() for log in core.logs()]
            elif command == "held":
                reply = core.held()
            elif command == "calm":
                core.calm()
                reply = "ok"
            else:
                reply = {"error": f"unknown command {command!r}"}
            print(json.dumps(reply), flush=True)
    finally:
        core.close()


if __name__ == "__main__":
    main(sys.argv)
