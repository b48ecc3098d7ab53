"""Whether this operator is the kopf peer in charge, for the tasks kopf does not pause itself.

kopf pauses its watches and handlers while a peer with a higher priority (or another one with the
same priority) is alive on the same peering object, and resumes them when it is gone. Tasks of the
operator's own - the resync loop and the reconciler's scheduled retries - know nothing of that, and
kopf 1.45 offers no public way to ask (its pause toggles live inside ``kopf.operator()``). So they ask
the peering object themselves, with kopf's rule (``kopf/_core/engines/peering.py``,
``process_peering_event``): paused while any other peer whose ``lastseen + lifetime`` lies in the
future has a priority at least ours. A missing peering object pauses too, as it does kopf with a
``--peering`` name. A failed read answers "paused": the watch-triggered rounds kopf runs are not
affected, only the timers wait for the next answer.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

__all__ = ["PeeringGate", "in_charge"]

log = logging.getLogger(__name__)

#: Seconds an answer is reused (the resync loop asks once per FetchPool).
CACHE_SECONDS = 1.0


def _parse(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def in_charge(peers: Mapping[str, Any], *, identity: str, priority: int, now: datetime.datetime) -> bool:
    """kopf's rule on a peering object's ``status`` (``{identity: {priority, lifetime, lastseen}}``)."""
    for peer, info in peers.items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        seen = _parse(info.get("lastseen"))
        try:
            lifetime = datetime.timedelta(seconds=int(info.get("lifetime", 60)))
            their_priority = int(info.get("priority", 0))
        except (TypeError, ValueError):
            continue
        if seen is not None and seen + lifetime > now and their_priority >= priority:
            return False
    return True


class PeeringGate:
    """``await gate(namespace)``: whether this operator acts there (see the module docstring).

    ``read(namespace)`` returns the peering object (the namespaced ``KopfPeering`` of that namespace,
    or the ``ClusterKopfPeering`` when ``namespace`` is ``None``), ``None`` when it does not exist.
    """

    def __init__(
        self,
        read: Callable[[str | None], Awaitable[Mapping[str, Any] | None]],
        *,
        identity: str,
        priority: int,
        clusterwide: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self.identity = identity
        self.priority = priority
        self.clusterwide = clusterwide
        self._clock = clock
        self._cache: dict[str | None, tuple[float, bool]] = {}

    async def __call__(self, namespace: str) -> bool:
        scope = None if self.clusterwide else namespace
        cached = self._cache.get(scope)
        if cached is not None and self._clock() - cached[0] < CACHE_SECONDS:
            return cached[1]
        try:
            peering = await self._read(scope)
        except Exception as exc:  # an API error: do not act on a guess
            log.debug("peering object of %s unreadable: %s", scope or "the cluster", exc)
            answer = False
        else:
            answer = peering is not None and in_charge(
                (peering.get("status") or {}),
                identity=self.identity,
                priority=self.priority,
                now=datetime.datetime.now(datetime.UTC),
            )
        self._cache[scope] = (self._clock(), answer)
        return answer
