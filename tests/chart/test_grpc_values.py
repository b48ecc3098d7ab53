"""The chart's gRPC keepalive and connection-age values reach `fetchpool serve` as its settings."""

from __future__ import annotations

import argparse
from typing import Any

import chartlib
import pytest
from fetchpool.config import add_arguments, settings_from_args


def _server_settings(values: dict[str, Any]) -> Any:
    """The ServerSettings `fetchpool serve` builds from the ConfigMap the chart renders."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args([]), environ=chartlib.render(values).configmap_env()).server


def test_defaults_accept_10_s_client_pings_and_never_cut_running_calls() -> None:
    server = _server_settings({})
    assert server.min_ping_interval == 5 and server.permit_keepalive_without_calls is True
    assert (server.keepalive_time, server.keepalive_timeout) == (60, 20)
    assert server.max_connection_age == 300 and server.max_connection_age_grace == 0


def test_values_become_settings() -> None:
    server = _server_settings({"config": {
        "grpcMaxConnectionAgeGrace": 30,
        "grpcKeepalive": {"time": 15, "timeout": 2.5, "minPingInterval": 1, "permitWithoutCalls": False},
    }})
    assert (server.max_connection_age_grace, server.keepalive_time, server.keepalive_timeout) == (30, 15, 2.5)
    assert server.min_ping_interval == 1 and server.permit_keepalive_without_calls is False


@pytest.mark.parametrize(("values", "fragment"), [
    ({"grpcKeepalive": {"minPingInterval": -1}}, "minPingInterval"),
    ({"grpcKeepalive": {"timeout": 0}}, "timeout"),
    ({"grpcKeepalive": {"permitWithoutCalls": "yes"}}, "permitWithoutCalls"),
    ({"grpcKeepalive": {"pingEvery": 10}}, "pingEvery"),
    ({"grpcMaxConnectionAgeGrace": -5}, "grpcMaxConnectionAgeGrace"),
])
def test_bad_values_are_refused(values: dict[str, Any], fragment: str) -> None:
    assert fragment in chartlib.render_error({"config": values})
