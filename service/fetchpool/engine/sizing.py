"""Pool sizing: the seed's formula, and dynamic working limits that follow demand."""

from __future__ import annotations

import math


def pool_size(concurrency: float, latency: float, processing_time: float) -> int:
    """Connections needed to keep ``concurrency`` workers busy: ``concurrency * (1 + latency / processing_time)``.

    From the project's seed (the connection-pooling guide's sizing rule): while a
    request waits ``latency`` seconds on the network, the connection is idle for
    its worker, so each worker needs ``1 + latency / processing_time`` connections
    to never wait. Seconds in, connections out (rounded up, at least 1).
    Raises ValueError for negative inputs or a zero processing time.
    """
    if concurrency < 0 or latency < 0 or processing_time <= 0:
        raise ValueError("concurrency and latency must be >= 0 and processing_time > 0")
    return max(1, math.ceil(concurrency * (1 + latency / processing_time) - 1e-9))


class DynamicLimit:
    """A working limit between ``floor`` and ``ceiling`` that follows observed demand.

    Each :meth:`update` (once a second) takes the peak demand (in flight + waiting)
    seen since the last one. The target is ``ceil(peak * headroom)`` clamped to
    [floor, ceiling]. Growth is immediate (waiting requests are admitted at once);
    shrinking needs the target to stay below ``current * (1 - hysteresis)`` for
    ``shrink_after`` consecutive updates, and then goes halfway, so a flapping load
    does not thrash the pool (the hysteresis idea of Kubernetes' HPA stabilization window).
    """

    __slots__ = ("_low_streak", "ceiling", "current", "decisions", "floor", "headroom", "hysteresis", "shrink_after")

    def __init__(self, floor: int, ceiling: int, *, headroom: float = 1.25, hysteresis: float = 0.25,
                 shrink_after: int = 5) -> None:
        self.floor = min(floor, ceiling)
        self.ceiling = ceiling
        self.current = ceiling
        self.headroom = headroom
        self.hysteresis = hysteresis
        self.shrink_after = shrink_after
        self._low_streak = 0
        self.decisions = 0

    def set_ceiling(self, ceiling: int) -> None:
        """A new ceiling (from SetPoolLimits or the operator); the working limit never exceeds it."""
        self.ceiling = ceiling
        self.floor = min(self.floor, ceiling)
        self.current = min(self.current, ceiling)

    def update(self, peak_demand: int) -> int:
        """Feed one sample; returns the working limit now."""
        target = max(self.floor, min(self.ceiling, math.ceil(peak_demand * self.headroom)))
        if target > self.current:
            self.current, self._low_streak = target, 0
            self.decisions += 1
        elif target < self.current * (1 - self.hysteresis):
            self._low_streak += 1
            if self._low_streak >= self.shrink_after:
                self.current = max(target, (self.current + target) // 2)
                self._low_streak = 0
                self.decisions += 1
        else:
            self._low_streak = 0
        return self.current
