"""Settings of ``fetchpool serve``: the frozen objects (:mod:`fetchpool.config.settings`) and the
flags and ``FETCHPOOL_*`` variables they are read from (:mod:`fetchpool.config.options`).

A flag beats its environment variable, which beats the embedded default.
"""

from fetchpool.config.options import BOOLEAN_WORDS, OPTIONS, Option, add_arguments, option_table, settings_from_args
from fetchpool.config.settings import (
    MAX_CONNECTIONS_CEILING,
    TRANSPORTS,
    FetchSettings,
    PoolLimits,
    PoolPolicy,
    RetryPolicy,
    ServerSettings,
    Settings,
    Timeouts,
    load_limits_file,
)

__all__ = [
    "BOOLEAN_WORDS",
    "MAX_CONNECTIONS_CEILING",
    "OPTIONS",
    "TRANSPORTS",
    "FetchSettings",
    "Option",
    "PoolLimits",
    "PoolPolicy",
    "RetryPolicy",
    "ServerSettings",
    "Settings",
    "Timeouts",
    "add_arguments",
    "load_limits_file",
    "option_table",
    "settings_from_args",
]
