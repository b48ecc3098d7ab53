"""TCP relays that change when a server's bytes reach the client. :func:`coalescing_relay` hands
them over in bursts, for tests of what a service does with results that complete together;
:func:`delaying_relay` holds the first of them, for tests of what happens before a server's
first bytes (its SETTINGS) arrive; :func:`resetting_relay` resets the client's connection after
a number of them, for tests of what a reset does to the streams of an HTTP/2 connection.

Without it "together" depends on the machine: a loaded one spreads 50 responses timed to the
same instant over tens of milliseconds, and a fast service writes each result before the next
arrives. The relay holds what the server sends until the server has been quiet for ``quiet``
seconds and then writes it in one piece, so the client reads it all in one go. The client's bytes
pass at once. It runs in the test's event loop: only for tests whose process under test is another
one (a ``fetchpool serve``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

Peer = tuple[str, int]


async def _pass(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def _in_bursts(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, quiet: float) -> None:
    held = bytearray()
    while True:
        try:
            # A read cancelled by the timeout loses nothing: the bytes stay in the reader's buffer.
            data = await asyncio.wait_for(reader.read(65536), quiet if held else None)
        except TimeoutError:
            writer.write(bytes(held))
            held.clear()
            await writer.drain()
            continue
        if not data:
            break
        held += data
    writer.write(bytes(held))
    await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def _late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    first = await reader.read(65536)
    await asyncio.sleep(delay)
    writer.write(first)
    await _pass(reader, writer)


async def _cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, after: int) -> None:
    passed = 0
    while passed < after and (data := await reader.read(min(65536, after - passed))):
        writer.write(data)
        passed += len(data)
        await writer.drain()
    # SO_LINGER 0: the close is a reset (RST), as a relay's or proxy's abort is.
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def coalescing_relay(upstream: Peer, quiet: float = 0.1) -> contextlib.AbstractAsyncContextManager[int]:
    """A loopback port relaying to ``upstream``; what the upstream sends reaches the client in
    bursts, each once the upstream has sent nothing for ``quiet`` seconds. Closed on exit."""
    return _relay(upstream, lambda reader, writer: _in_bursts(reader, writer, quiet))


def delaying_relay(upstream: Peer, delay: float) -> contextlib.AbstractAsyncContextManager[int]:
    """A loopback port relaying to ``upstream``; the upstream's first bytes on each connection
    reach the client ``delay`` seconds late (the rest after them). Closed on exit."""
    return _relay(upstream, lambda reader, writer: _late(reader, writer, delay))


def resetting_relay(upstream: Peer, after: int) -> contextlib.AbstractAsyncContextManager[int]:
    """A loopback port relaying to ``upstream``; each client connection is reset once ``after``
    bytes of the upstream's reached it. Closed on exit."""
    return _relay(upstream, lambda reader, writer: _cut(reader, writer, after))


@contextlib.asynccontextmanager
async def _relay(upstream: Peer, downstream: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                      Awaitable[None]]) -> AsyncIterator[int]:
    tasks: set[asyncio.Task[object]] = set()

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*upstream)
            directions = (_pass(client_reader, upstream_writer), downstream(upstream_reader, client_writer))
            await asyncio.gather(*directions)
        except OSError:
            pass  # the upstream refused, or a side reset the connection: both are closed below
        finally:
            client_writer.close()
            if upstream_writer is not None:
                upstream_writer.close()

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(relay(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
