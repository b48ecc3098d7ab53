"""The request limit learned per origin from servers' GOAWAYs (engine/_httpcore/limits.py):
plain policy, no server needed."""

from __future__ import annotations

from fetchpool.engine._httpcore import limits
from fetchpool.engine._httpcore.limits import RequestLimits
from hypothesis import given
from hypothesis import strategies as st

A = (b"https", b"a.test", 443)
B = (b"https", b"b.test", 443)


def test_a_limit_is_learned_when_two_connections_in_a_row_end_at_the_same_count() -> None:
    learned = RequestLimits()
    learned.refused_after(A, 20)
    assert learned.limit(A) == 0  # once could be a shutdown
    learned.refused_after(B, 20)
    assert learned.limit(A) == 0  # per origin
    learned.refused_after(A, 20)
    assert learned.limit(A) == 20 and learned.limit(B) == 0


def test_a_different_count_drops_what_was_learned() -> None:
    learned = RequestLimits()
    for count in (1000, 1000, 7):  # a restart's GOAWAY after the limit was learned
        learned.refused_after(A, count)
    assert learned.limit(A) == 0
    learned.refused_after(A, 7)
    assert learned.limit(A) == 7


def test_a_goaway_that_accepted_nothing_teaches_nothing() -> None:
    learned = RequestLimits()
    learned.refused_after(A, 0)
    learned.refused_after(A, 0)
    assert learned.limit(A) == 0


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 3)), max_size=60))
def test_a_limit_is_learned_exactly_when_an_origins_last_two_counts_agree(events: list[tuple[int, int]]) -> None:
    learned, last = RequestLimits(), {}
    for host, count in events:
        key = (b"https", b"h%d" % host, 443)
        learned.refused_after(key, count)
        assert learned.limit(key) == (count if last.get(key) == count else 0)
        last[key] = count


def test_memory_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(limits, "MEMORY", 3)
    learned = RequestLimits()
    for host in range(10):
        key = (b"https", b"h%d" % host, 443)
        learned.refused_after(key, 5)
        learned.refused_after(key, 5)
    assert len(learned._learned) == 3 and len(learned._last) == 3
    assert learned.limit((b"https", b"h9", 443)) == 5 and learned.limit((b"https", b"h0", 443)) == 0
