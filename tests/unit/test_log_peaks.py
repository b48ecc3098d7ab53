"""The peak count the stream-limit tests read from nginx's access log."""

from __future__ import annotations

from support.servers import concurrency_peaks


def test_a_request_starting_in_the_millisecond_another_ended_is_not_counted_with_it() -> None:
    # In floats 1765138825.123 - 1.005 is 1765138824.1179998, before the first request's end.
    back_to_back = [{"msec": 1765138824.118, "request_time": 0.5, "connection": 1},
                    {"msec": 1765138825.123, "request_time": 1.005, "connection": 1}]
    assert concurrency_peaks(back_to_back) == (1, {1: 1})


def test_overlapping_requests_are_counted_per_connection_and_in_all() -> None:
    entries = [{"msec": 10.0, "request_time": 2.0, "connection": 1},
               {"msec": 10.5, "request_time": 1.0, "connection": 1},
               {"msec": 10.0, "request_time": 1.0, "connection": 2},
               {"msec": 20.0, "request_time": 1.0, "connection": 2}]
    assert concurrency_peaks(entries) == (3, {1: 2, 2: 1})
