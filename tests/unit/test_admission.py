"""The admission limiter: FIFO, live resize, per-host cap, timeouts and cancellation."""

from __future__ import annotations

import asyncio

import pytest
from fetchpool.engine.admission import Admission, AdmissionTimeout


async def _start(admission: Admission, host: str, timeout: float = 5.0) -> asyncio.Task[None]:
    task = asyncio.create_task(admission.acquire(host, timeout))
    await asyncio.sleep(0)
    return task


async def test_capacity_is_enforced_and_waiters_are_served_in_order() -> None:
    admission = Admission(2)
    await admission.acquire("a", 1)
    await admission.acquire("a", 1)
    first, second = await _start(admission, "a"), await _start(admission, "a")
    assert (admission.active, admission.waiting) == (2, 2)
    admission.release("a")
    await asyncio.sleep(0)
    assert first.done() and not second.done()
    admission.release("a")
    await asyncio.sleep(0)
    assert second.done()
    assert (admission.active, admission.waiting) == (2, 0)


async def test_growing_admits_waiters_at_once_and_shrinking_waits_for_holders() -> None:
    admission = Admission(1)
    await admission.acquire("a", 1)
    waiters = [await _start(admission, "a") for _ in range(3)]
    admission.resize(3, 0)
    await asyncio.sleep(0)
    assert [w.done() for w in waiters] == [True, True, False]
    admission.resize(1, 0)  # 3 holders, capacity 1: nobody new until two have left
    for _ in range(2):
        admission.release("a")
    await asyncio.sleep(0)
    assert not waiters[2].done()
    admission.release("a")
    await asyncio.sleep(0)
    assert waiters[2].done() and admission.active == 1


async def test_per_host_cap_lets_other_hosts_pass() -> None:
    admission = Admission(10, per_host=1)
    await admission.acquire("a", 1)
    blocked = await _start(admission, "a")
    other = await _start(admission, "b")
    assert other.done() and not blocked.done()
    admission.release("a")
    await asyncio.sleep(0)
    assert blocked.done()


async def test_timeout_raises_and_leaves_nothing_held() -> None:
    admission = Admission(1)
    await admission.acquire("a", 1)
    with pytest.raises(AdmissionTimeout):
        await admission.acquire("a", 0.05)
    assert (admission.active, admission.waiting) == (1, 0)


async def test_cancelled_waiter_is_dropped_even_when_a_slot_frees_meanwhile() -> None:
    admission = Admission(1)
    await admission.acquire("a", 1)
    waiter = await _start(admission, "a")
    waiter.cancel()
    admission.release("a")  # runs before the cancelled task's cleanup
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (admission.active, admission.waiting) == (0, 0)
    await admission.acquire("a", 0.1)
    assert admission.active == 1
