"""Clean-up that a cancellation cannot stop half-way."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def shielded(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` in a task of its own that runs to its end even when the caller is
    cancelled meanwhile (the caller still gets its ``CancelledError`` at once).

    httpcore guards its clean-up with ``AsyncShieldCancellation``, an anyio cancel scope: it
    keeps anyio's own cancellations out, not asyncio's ``Task.cancel()``, which is how gRPC
    and fetchpool cancel. A second cancellation could then stop a connection's clean-up
    half-way and leave it counted but unusable.
    """
    return await asyncio.shield(asyncio.ensure_future(awaitable))
