"""The HTTP/2 building blocks of engine/_httpcore, against h2 itself: a real h2 server state
machine produces the frames (GOAWAY, then the DATA of the streams it still answers)."""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httpcore
import hyperframe.frame
import pytest
import uvloop
from fetchpool.engine._httpcore.h2_support import DrainingH2Connection, StreamSlots, stream_info

REQUEST = [(":method", "GET"), (":authority", "example.test"), (":scheme", "https"), (":path", "/")]


def _pair(draining: bool) -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    config = h2.config.H2Configuration(client_side=True)
    client = DrainingH2Connection(config) if draining else h2.connection.H2Connection(config)
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


def _goaway_then_answers(client: h2.connection.H2Connection, server: h2.connection.H2Connection) -> bytes:
    """Three requests; the server says GOAWAY after the first two, then answers those two."""
    for stream_id in (1, 3, 5):
        client.send_headers(stream_id, REQUEST, end_stream=True)
    server.receive_data(client.data_to_send())
    server.data_to_send()
    for stream_id in (1, 3):
        server.send_headers(stream_id, [(":status", "200")])
        server.send_data(stream_id, b"page %d" % stream_id, end_stream=True)
    # GOAWAY first (stream 5 will never be processed), as nginx sends it at its request limit;
    # h2 cannot send frames after its own GOAWAY, so that one frame is spliced in.
    return hyperframe.frame.GoAwayFrame(0, last_stream_id=3).serialize() + server.data_to_send()


def test_h2_alone_drops_the_answers_that_follow_a_goaway() -> None:
    # The fault the draining state machine exists for (python-hyper/h2 #1181): one read holding
    # the GOAWAY and the answers after it raises, and every event of that read is lost.
    client, server = _pair(draining=False)
    with pytest.raises(h2.exceptions.ProtocolError):
        client.receive_data(_goaway_then_answers(client, server))


def test_a_draining_connection_receives_the_streams_the_peer_still_answers() -> None:
    client, server = _pair(draining=True)
    events = client.receive_data(_goaway_then_answers(client, server))
    [terminated] = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert terminated.last_stream_id == 3
    bodies = {e.stream_id: e.data for e in events if isinstance(e, h2.events.DataReceived)}
    assert bodies == {1: b"page 1", 3: b"page 3"}
    assert {e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)} == {1, 3}
    # Closed for new streams (httpcore's is_available() reads this), open for acknowledgements.
    assert client.state_machine.state is h2.connection.ConnectionState.CLOSED
    client.acknowledge_received_data(6, 1)
    with pytest.raises(h2.exceptions.ProtocolError):
        client.send_headers(7, REQUEST, end_stream=True)


def _update_queued_then_goaway(client: h2.connection.H2Connection, server: h2.connection.H2Connection,
                               also_queued: int | None = None) -> int:
    """The server spends most of its connection window on stream 1; the client reads it all, so
    h2 queues a connection WINDOW_UPDATE (and the request of stream ``also_queued``, if given);
    before they are written, the server's GOAWAY (stream 1 accepted) is read. Returns the
    server's connection window left."""
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "200")])
    for _ in range(3):
        server.send_data(1, b"x" * 16_000)
    client.receive_data(server.data_to_send())
    client.acknowledge_received_data(48_000, 1)
    assert client._data_to_send, "h2 queued no WINDOW_UPDATE: the premise of the test is gone"
    if also_queued is not None:
        client.send_headers(also_queued, REQUEST, end_stream=True)
    client.receive_data(hyperframe.frame.GoAwayFrame(0, last_stream_id=1).serialize())
    return server.outbound_flow_control_window


def test_h2_alone_drops_the_window_update_it_had_not_written_when_a_goaway_arrives() -> None:
    # The fault DrainingH2Connection exists for: the server, its window spent, waits for ever.
    client, server = _pair(draining=False)
    left = _update_queued_then_goaway(client, server)
    assert client.data_to_send() == b""
    assert left == 65_535 - 48_000  # the initial window, less what it sent


def test_a_draining_connection_still_sends_the_window_update_the_server_needs() -> None:
    client, server = _pair(draining=True)
    left = _update_queued_then_goaway(client, server)
    events = server.receive_data(client.data_to_send())
    assert [e.delta for e in events if isinstance(e, h2.events.WindowUpdated) and e.stream_id == 0] == [48_000]
    assert server.outbound_flow_control_window == left + 48_000
    server.send_data(1, b"the rest", end_stream=True)  # and it can finish the stream
    events = client.receive_data(server.data_to_send())
    assert any(isinstance(e, h2.events.StreamEnded) and e.stream_id == 1 for e in events)


def test_frames_for_streams_the_goaway_refused_are_not_written_after_it() -> None:
    client, server = _pair(draining=True)
    _update_queued_then_goaway(client, server, also_queued=3)  # stream 3: above the last stream id
    events = server.receive_data(client.data_to_send())
    # The connection's and stream 1's updates; nothing of stream 3's request.
    assert sorted((type(e).__name__, e.stream_id) for e in events) == [("WindowUpdated", 0), ("WindowUpdated", 1)]


def test_no_window_update_is_written_once_every_accepted_stream_has_ended() -> None:
    # A proxy that closes its tunnel while such late bytes sit unread in it resets the connection
    # and destroys the answers it had not passed on yet: nothing is written that nobody needs.
    client, server = _pair(draining=True)
    for stream_id in (1, 3):
        client.send_headers(stream_id, REQUEST, end_stream=True)
    server.receive_data(client.data_to_send())
    for stream_id in (1, 3):
        server.send_headers(stream_id, [(":status", "200")])
        server.send_data(stream_id, b"x" * 16_000)
    server.send_data(1, b"x" * 16_000, end_stream=True)
    client.receive_data(hyperframe.frame.GoAwayFrame(0, last_stream_id=3).serialize() + server.data_to_send())
    client.acknowledge_received_data(32_000, 1)
    client.acknowledge_received_data(16_000, 3)
    # Stream 3 still receives: the connection's update goes (and stream 3's own, once due).
    events = server.receive_data(client.data_to_send())
    assert [(e.stream_id, e.delta) for e in events if isinstance(e, h2.events.WindowUpdated)] == [(0, 48_000)]
    server.send_data(3, b"x" * 16_000)
    server.send_data(3, b"x" * 16_000)
    server.send_data(3, b"x" * 1_000, end_stream=True)
    client.receive_data(server.data_to_send())
    client.acknowledge_received_data(33_000, 3)
    assert client._data_to_send, "h2 queued no WINDOW_UPDATE: the premise of the test is gone"
    assert client.data_to_send() == b""


def test_a_connection_closed_for_another_reason_stays_closed() -> None:
    client, _ = _pair(draining=True)
    client.close_connection()  # our own GOAWAY: nothing more may be received
    assert client.state_machine.state is h2.connection.ConnectionState.CLOSED
    assert not client.state_machine.draining


async def test_stream_slots_are_taken_and_given_back_without_waiting_when_free() -> None:
    slots = StreamSlots(2)
    await slots.acquire()
    await slots.acquire()
    waiter = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    assert not waiter.done() and slots.available == 0
    slots.release()
    await waiter
    assert slots.available == 0


async def test_a_cancelled_slot_waiter_holds_nothing() -> None:
    slots = StreamSlots(0)
    waiters = [asyncio.ensure_future(slots.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()
    slots.release(1)  # handed to the first waiter still waiting
    await asyncio.sleep(0)
    assert waiters[1].done() and not waiters[2].done() and slots.available == 0
    waiters[2].cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    slots.release(1)
    assert slots.available == 1  # nothing lost, nothing counted twice


async def test_the_peer_lowering_its_limit_below_the_open_streams_blocks_new_ones() -> None:
    slots = StreamSlots(3)
    for _ in range(3):
        await slots.acquire()
    slots.release(-2)  # the peer's SETTINGS: one stream at most, three open
    for _ in range(2):
        slots.release()
    waiter = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    assert not waiter.done()  # two streams closed; one is still open, at the new limit
    slots.release()
    await waiter


def test_a_stream_whose_connection_is_gone_has_no_extra_info_rather_than_an_error() -> None:
    """On uvloop (the service's loop) a closed transport's socket is None, and anyio then raises
    AttributeError from any ``get_extra_info``: a fetch whose tunnel's proxy died as its TLS
    handshake ended came back INTERNAL. A live stream's info is passed through."""

    async def main() -> None:
        server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        stream = await httpcore.AnyIOBackend().connect_tcp("127.0.0.1", port)
        # Not asked for anything before: uvloop keeps the socket object once it has handed it out.
        stream._stream._transport.close()  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
        with pytest.raises(AttributeError):
            stream.get_extra_info("ssl_object")
        assert stream_info(stream, "ssl_object") is None
        assert stream_info(stream, "socket") is None
        assert stream_info(None, "socket") is None
        live = await httpcore.AnyIOBackend().connect_tcp("127.0.0.1", port)
        assert stream_info(live, "server_addr") == ("127.0.0.1", port)
        await live.aclose()
        server.close()

    uvloop.run(main())
