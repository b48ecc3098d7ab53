"""The instruments: histograms recorded per fetch / per call, observable ones read from pool snapshots."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from fetchpool.engine import PoolSnapshot
from fetchpool.telemetry import names as n
from fetchpool.telemetry.histograms import Histogram, SdkHistogram
from fetchpool.telemetry.pools import PoolReader


class Instruments:
    """Every metric of :mod:`fetchpool.telemetry.names`: the histograms and, on ``meter``, the
    observable instruments and the drop counter.

    The histograms are aggregated by :mod:`fetchpool.telemetry.histograms` (``histograms`` lists
    them, to attach to the readers), or with ``sdk_histograms`` by the SDK's instruments on ``meter``
    (``histograms`` is then empty).
    """

    def __init__(self, meter: Meter, pools: PoolReader, *, sdk_histograms: bool = False) -> None:
        self._pools = pools

        def histogram(metric: n.MetricName, bounds: tuple[float, ...]) -> Histogram | SdkHistogram:
            return SdkHistogram(meter, metric, bounds) if sdk_histograms else Histogram(metric, bounds)

        self.request_duration = histogram(n.HTTP_CLIENT_REQUEST_DURATION, n.DURATION_BUCKETS)
        self.connection_duration = histogram(n.HTTP_CLIENT_CONNECTION_DURATION, n.CONNECTION_DURATION_BUCKETS)
        self.wait_time = histogram(n.POOL_WAIT_TIME, n.WAIT_BUCKETS)
        self.create_time = histogram(n.POOL_CONNECTION_CREATE_TIME, n.CREATE_BUCKETS)
        self.rpc_duration = histogram(n.RPC_SERVER_CALL_DURATION, n.RPC_DURATION_BUCKETS)
        self.histograms = tuple(h for h in (self.request_duration, self.connection_duration, self.wait_time,
                                            self.create_time, self.rpc_duration) if isinstance(h, Histogram))
        self.dropped = meter.create_counter(
            n.TELEMETRY_DROPPED.name, unit="{item}", description=n.TELEMETRY_DROPPED.description)

        def per_pool(value: Callable[[PoolSnapshot], float]) -> Callable[[CallbackOptions], Iterable[Observation]]:
            def callback(options: CallbackOptions) -> Iterable[Observation]:
                return [Observation(value(s), {n.POOL_NAME: s.pool}) for s in self._pools.snapshots()]
            return callback

        def connections(options: CallbackOptions) -> Iterable[Observation]:
            observations = []
            for s in self._pools.snapshots():
                observations.append(Observation(
                    s.connections_active, {n.HTTP_CONNECTION_STATE: n.CONNECTION_STATE_ACTIVE, n.POOL_NAME: s.pool}))
                observations.append(Observation(
                    s.connections_idle, {n.HTTP_CONNECTION_STATE: n.CONNECTION_STATE_IDLE, n.POOL_NAME: s.pool}))
            return observations

        def demand(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(sum(s.requests_active + s.requests_waiting for s in self._pools.snapshots()))]

        def updown(metric: n.MetricName, callback: Callable[[CallbackOptions], Iterable[Observation]]) -> None:
            meter.create_observable_up_down_counter(
                metric.name, callbacks=[callback], unit=metric.unit, description=metric.description)

        def counter(metric: n.MetricName, callback: Callable[[CallbackOptions], Iterable[Observation]]) -> None:
            meter.create_observable_counter(
                metric.name, callbacks=[callback], unit=metric.unit, description=metric.description)

        updown(n.HTTP_CLIENT_ACTIVE_REQUESTS, per_pool(lambda s: s.requests_active))
        updown(n.HTTP_CLIENT_OPEN_CONNECTIONS, connections)
        updown(n.POOL_CONNECTION_MAX, per_pool(lambda s: s.limits.max_connections))
        updown(n.POOL_CONNECTION_IDLE_MAX, per_pool(lambda s: s.limits.max_keepalive_connections))
        updown(n.POOL_PENDING_REQUESTS, per_pool(lambda s: s.requests_waiting))
        updown(n.POOL_HTTP2_STREAMS, per_pool(lambda s: s.http2_streams))
        updown(n.POOL_WORKING_LIMIT, per_pool(lambda s: s.working_limit))
        updown(n.POOL_PROXY_EJECTED, per_pool(lambda s: int(s.ejected)))
        updown(n.DEMAND, demand)
        counter(n.POOL_TIMEOUTS, per_pool(lambda s: s.pool_timeouts_total))
        counter(n.POOL_CONNECTIONS_CREATED, per_pool(lambda s: s.connections_created_total))
        counter(n.POOL_RETRIES, per_pool(lambda s: s.retries_total))
        counter(n.POOL_CONNECTIONS_RETIRED, per_pool(lambda s: s.connections_retired_total))
