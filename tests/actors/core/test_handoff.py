"""The hand-off kit's pure parts: when a route's first message is complete, and the refusal tally."""

from __future__ import annotations

import pytest

from villagemesh.actors.core.handoff import MAX_HEADER_BYTES, ConnectionLimiter, RefusalTally, Route, handshake_done
from villagemesh.errors import ConfigError
from villagemesh.protocols.noise import HEADER as SECURE_HEADER
from villagemesh.protocols.sniff import MULTISTREAM_HEADER

WHOLE = {
    Route.HTTP: b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
    Route.DISCOVERY: b"\x00\x00\x00\x02{}",
    Route.SECURE: SECURE_HEADER + b"\x00\x20" + bytes(32),
    Route.TLS: b"\x16\x03\x01\x00\x04" + bytes(4),
    Route.LIBP2P: MULTISTREAM_HEADER,
}


@pytest.mark.parametrize("route", list(Route))
def test_every_route_has_a_rule_its_first_message_completes_and_no_shorter_prefix_does(route):
    whole = WHOLE[route]
    assert handshake_done(route, whole) is True
    assert handshake_done(route, whole + b"more") is True
    for cut in range(len(whole)):
        assert not handshake_done(route, whole[:cut]), (route, cut)


def test_http_headers_that_never_end_are_refused_past_the_limit():
    assert handshake_done(Route.HTTP, b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 10) is False
    assert handshake_done(Route.HTTP, b"GET / HTTP/1.1\r\n" + b"X" * MAX_HEADER_BYTES) is None


def test_the_tally_writes_the_first_few_in_full_and_sums_up_the_rest():
    tally = RefusalTally(in_full=2)
    assert [tally.note("cap", f"10.0.0.{i % 3}") for i in range(7)] == [True, True] + [False] * 5
    summary = tally.take()
    assert summary is not None
    assert (summary["count"], summary["written_in_full"], summary["by_kind"], summary["sources"]) == (
        7,
        2,
        {"cap": 7},
        3,
    )
    assert not tally.pending and tally.take() is None
    assert tally.note("eof", "10.0.0.9") is True  # a new interval
    assert tally.take() is None  # everything was written in full: no summary line


def test_a_slot_releases_once_however_often_it_is_called():
    limiter = ConnectionLimiter(1, 2)
    assert limiter.try_open("a") and not limiter.try_open("a")
    release = limiter.slot("a")
    release()
    release()
    assert limiter.total == 0 and limiter.try_open("a")
    with pytest.raises(ConfigError):
        ConnectionLimiter(0, 1)
