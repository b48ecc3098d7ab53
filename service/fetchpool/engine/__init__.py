"""The fetch engine: admission, pools (one per proxy), proxies, body limits. Knows nothing of gRPC."""

from fetchpool.engine.fetcher import Engine
from fetchpool.engine.hooks import FetchObserver
from fetchpool.engine.model import FetchSpec, Outcome, Timings
from fetchpool.engine.pool import PoolSnapshot

__all__ = ["Engine", "FetchObserver", "FetchSpec", "Outcome", "PoolSnapshot", "Timings"]
