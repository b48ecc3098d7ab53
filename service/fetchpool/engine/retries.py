"""Retry decisions: which failures, how long to wait, and the budget that caps them."""

from __future__ import annotations

import email.utils
import random
import time

from fetchpool.config import RetryPolicy
from fetchpool.errors import ErrorKind

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
#: Failures after which an idempotent request may be sent again.
RETRYABLE = frozenset({ErrorKind.CONNECT, ErrorKind.PROXY, ErrorKind.NETWORK, ErrorKind.PROTOCOL})
#: Failures before the request left us: any method may be retried.
NOT_SENT = frozenset({ErrorKind.CONNECT, ErrorKind.PROXY})


def retryable(kind: ErrorKind, method: str) -> bool:
    """Whether a failure of ``kind`` may be retried for ``method`` (RFC 9110 §9.2.2 idempotency)."""
    return kind in NOT_SENT or (method in IDEMPOTENT and kind in RETRYABLE)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).

    Returns None when absent or unparsable; a date in the past gives 0.
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


_rng = random.Random()


def backoff(retry: int, policy: RetryPolicy, rng: random.Random = _rng) -> float:
    """Seconds before retry number ``retry`` (1-based): full jitter over an exponential cap."""
    return rng.uniform(0.0, min(policy.backoff_max, policy.backoff_base * 2 ** (retry - 1)))


class RetryBudget:
    """Caps retries in progress relative to requests in flight (Envoy's ``retry_budget``).

    ``requests`` is updated by the engine as fetches start and end; a retry is
    allowed while ``retries < max(minimum, ratio * requests)``.
    """

    __slots__ = ("minimum", "ratio", "requests", "retries", "total")

    def __init__(self, ratio: float, minimum: int) -> None:
        self.ratio = ratio
        self.minimum = minimum
        self.requests = 0
        self.retries = 0
        self.total = 0

    def try_acquire(self) -> bool:
        """Take a retry slot if the budget allows; release it with :meth:`release`."""
        if self.retries >= max(self.minimum, self.ratio * self.requests):
            return False
        self.retries += 1
        self.total += 1
        return True

    def release(self) -> None:
        """The retry attempt ended."""
        self.retries -= 1
