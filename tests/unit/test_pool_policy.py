"""Pure pieces of pool control: retries, Retry-After, budget, proxy health and choice, sizing."""

from __future__ import annotations

import email.utils
import random
from dataclasses import dataclass

import pytest
from fetchpool.config import PoolLimits, RetryPolicy
from fetchpool.engine.proxies import ProxyHealth, Selector, parse_proxy
from fetchpool.engine.retries import RetryBudget, backoff, parse_retry_after, retryable
from fetchpool.engine.sizing import DynamicLimit, pool_size
from fetchpool.errors import ConfigError, ErrorKind, InvalidLimits
from hypothesis import given
from hypothesis import strategies as st


def test_retry_after_seconds_and_http_date() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after("1", now) == 1.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == pytest.approx(30, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("", now) is None


def test_only_idempotent_requests_are_retried_after_they_were_sent() -> None:
    assert retryable(ErrorKind.NETWORK, "GET") and not retryable(ErrorKind.NETWORK, "POST")
    assert retryable(ErrorKind.CONNECT, "POST")  # never left: safe for any method
    assert not retryable(ErrorKind.TIMEOUT, "GET") and not retryable(ErrorKind.TLS, "GET")
    assert not retryable(ErrorKind.PROXY_AUTH, "GET")


@given(st.integers(1, 30))
def test_backoff_is_jittered_under_the_exponential_cap(retry: int) -> None:
    policy = RetryPolicy(backoff_base=0.1, backoff_max=2.0)
    delays = [backoff(retry, policy, random.Random(seed)) for seed in range(20)]
    assert all(0 <= d <= min(2.0, 0.1 * 2 ** (retry - 1)) for d in delays)


def test_retry_budget_caps_concurrent_retries() -> None:
    budget = RetryBudget(ratio=0.2, minimum=3)
    budget.requests = 50
    granted = [budget.try_acquire() for _ in range(12)]
    assert granted.count(True) == 10  # 20 % of 50
    budget.release()
    assert budget.try_acquire() and not budget.try_acquire()
    small = RetryBudget(ratio=0.2, minimum=3)
    small.requests = 1
    assert [small.try_acquire() for _ in range(4)] == [True, True, True, False]


def test_proxy_is_ejected_after_consecutive_failures_and_readmitted_later() -> None:
    health = ProxyHealth(failures=3, base_seconds=10)
    assert not health.failure(0) and not health.failure(0)
    health.success()  # the streak is broken
    assert not health.failure(1) and not health.failure(1)
    assert health.failure(1) and not health.available(5) and health.available(11)
    for _ in range(3):
        health.failure(12)
    assert not health.available(31) and health.available(32)  # second ejection lasts twice as long


@dataclass
class FakePool:
    """A selector candidate (plain data; the selector reads three attributes)."""

    name: str
    load: int = 0
    available: bool = True


def test_selector_policies() -> None:
    pools = [FakePool("a"), FakePool("b", load=5), FakePool("c", load=1)]
    rr = Selector("round_robin", pools)
    assert [rr.pick().name for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    assert Selector("least_busy", pools).pick().name == "a"
    sticky = Selector("sticky", pools)
    chosen = {sticky.pick("alice").name for _ in range(10)}
    assert len(chosen) == 1
    assert len({sticky.pick(f"user{i}").name for i in range(50)}) == 3
    pools[0].available = False
    assert {rr.pick().name for _ in range(6)} == {"b", "c"}
    assert rr.pick(avoid=pools[1]).name == "c"
    for pool in pools:
        pool.available = False
    assert rr.pick().name in {"a", "b", "c"}  # never fail for want of a proxy


def test_proxy_urls_are_checked_and_redacted() -> None:
    config = parse_proxy("http://user:secret@127.0.0.1:3128")
    assert config.key == "http://REDACTED:REDACTED@127.0.0.1:3128" and "secret" not in repr(config)
    for bad in ("ftp://127.0.0.1:21", "http://user@127.0.0.1:1", "socks5://127.0.0.1", "http://h:1/path"):
        with pytest.raises(ConfigError):
            parse_proxy(bad)
    with pytest.raises(ConfigError) as caught:
        parse_proxy("gopher://me:hunter2@127.0.0.1:70")
    assert "hunter2" not in str(caught.value)


def test_pool_size_formula() -> None:
    # The seed's example: 10 workers, 200 ms network latency, 50 ms processing -> 50 connections.
    assert pool_size(10, 0.2, 0.05) == 50
    assert pool_size(0, 1, 1) == 1
    with pytest.raises(ValueError):
        pool_size(10, 0.2, 0)


def test_dynamic_limit_grows_at_once_and_shrinks_with_hysteresis() -> None:
    limit = DynamicLimit(floor=2, ceiling=100)
    limit.current = 10
    assert limit.update(40) == 50  # grows at once to demand x 1.25
    for _ in range(4):
        assert limit.update(4) == 50  # low, but not long enough
    assert limit.update(4) == 27  # halfway to the target of 5
    assert limit.update(30) == 38  # growth again
    limit.update(29)
    assert limit.current == 38  # within the hysteresis band: no change
    limit.set_ceiling(20)
    assert limit.current == 20 and limit.update(1000) == 20


def test_invalid_limits_are_refused() -> None:
    for bad in (
        {"max_connections": 0},
        {"max_connections": 10**7},
        {"keepalive_expiry": -1},
        {"max_connections": 5, "max_keepalive_connections": 6},
        {"pool_timeout": float("nan")},
    ):
        with pytest.raises(InvalidLimits):
            PoolLimits().replace(**bad)
    assert PoolLimits().replace(max_connections=5).max_keepalive_connections == 5


def test_a_limit_clamped_to_an_invalid_max_connections_is_not_reported() -> None:
    # The clamped limits were not given: only max_connections is at fault. Values given are checked as given.
    with pytest.raises(InvalidLimits) as caught:
        PoolLimits().replace(max_connections=-1)
    assert caught.value.fields == (("max_connections", "must be in 1..100000, got -1"),)
    assert str(caught.value) == "max_connections must be in 1..100000, got -1"
    with pytest.raises(InvalidLimits) as caught:
        PoolLimits().replace(max_connections=0, max_connections_per_host=3)
    assert [name for name, _ in caught.value.fields] == ["max_connections", "max_connections_per_host"]
