"""PhaseRecorder's account of sends a transport repeated itself (the retry reasons of a result)."""

from __future__ import annotations

import time

from fetchpool.engine.phases import REFUSED, PhaseRecorder


def test_each_repeated_send_has_one_reason_and_a_reason_without_a_send_none() -> None:
    recorder = PhaseRecorder()
    now = time.monotonic()
    recorder.timed(now, [], connected=False, responded=True, http2=True, sends=3, resent=["NETWORK: reset"])
    assert recorder.resent == ["NETWORK: reset", REFUSED]  # a send without its reason: a GOAWAY's
    again = PhaseRecorder()
    # libcurl's resend held back at a connection's limit, then never sent (its deadline came):
    again.timed(now, [], connected=False, responded=False, http2=True, sends=1, resent=["NETWORK: reset"])
    assert again.resent == [] and again.sends == 1
