"""The cold-origin gate of the curl transport (curl/cold.py), without libcurl; the engine test
test_a_first_request_cancelled_before_the_servers_settings_hands_on_its_place sees it at work."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fetchpool.engine.transports.curl.cold import ColdOrigins

ORIGIN = ("https", "a.example", 443)


async def _first_and_held(cold: ColdOrigins) -> tuple[Callable[[asyncio.Future[None]], None],
                                                       asyncio.Future[None], list[asyncio.Task[object]]]:
    """The first request's callback, the future of its headers, and 3 requests held behind it."""
    opened = await cold.wait(ORIGIN)
    assert opened is not None
    held = [asyncio.ensure_future(cold.wait(ORIGIN)) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(task.done() for task in held)  # all wait for the first request's answer
    return opened, asyncio.get_running_loop().create_future(), held


async def test_the_first_answer_lets_every_request_go_and_the_origin_stays_warm() -> None:
    cold = ColdOrigins()
    opened, headers, held = await _first_and_held(cold)
    headers.set_result(None)
    opened(headers)
    assert await asyncio.gather(*held) == [None, None, None]
    assert await cold.wait(ORIGIN) is None


async def test_a_cancelled_first_request_hands_its_place_to_one_held_request() -> None:
    cold = ColdOrigins()
    opened, headers, held = await _first_and_held(cold)
    headers.cancel()
    opened(headers)
    for _ in range(5):  # through the shield, each a turn of the loop
        await asyncio.sleep(0)
    done = [task for task in held if task.done()]
    assert len(done) == 1 and done[0].result() is not None  # the new first request
    assert not any(task.done() for task in held if task is not done[0])


async def test_a_failed_first_request_lets_every_request_go_and_the_origin_is_cold_again() -> None:
    cold = ColdOrigins()
    opened, headers, held = await _first_and_held(cold)
    headers.set_exception(ConnectionRefusedError())
    opened(headers)
    assert await asyncio.gather(*held) == [None, None, None]
    assert await cold.wait(ORIGIN) is not None
