"""LAN discovery's pure core: token buckets per source, the beacon schedule, the peer book and its deltas."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from villagemesh.actors.lan.state import (
    ANSWER_UNLESS_DUE_S,
    ANSWERERS,
    CHANGED,
    FRESHER,
    NEW,
    RELAY_MAX_AGE_S,
    RELAY_REFRESH_S,
    STALE,
    BeaconSchedule,
    Listing,
    PeerBook,
    SourceRateLimiter,
    TokenBucket,
    answers_newcomer,
    pick,
)
from villagemesh.errors import ConfigError
from villagemesh.protocols.discovery import RelayedPeer

TIMES = st.lists(st.floats(0, 1000, allow_nan=False), min_size=1, max_size=60).map(sorted)


@given(times=TIMES, rate=st.floats(0.1, 10), burst=st.integers(1, 10))
def test_a_source_never_gets_more_than_burst_plus_refill(times: list[float], rate: float, burst: int) -> None:
    """Over any run, allowed beacons <= burst + rate x elapsed."""
    limiter = SourceRateLimiter(rate=rate, burst=burst)
    allowed = sum(limiter.allow("10.0.0.1", t) for t in times)
    assert allowed <= burst + rate * (times[-1] - times[0]) + 1e-9


def test_a_flood_is_cut_to_the_burst_and_other_sources_are_untouched() -> None:
    """100 beacons at one instant from one source: burst pass; another source still passes."""
    limiter = SourceRateLimiter(rate=1.0, burst=5)
    assert sum(limiter.allow("10.0.0.66", 7.0) for _ in range(100)) == 5
    assert limiter.allow("10.0.0.2", 7.0)
    assert not limiter.allow("10.0.0.66", 7.5)
    assert limiter.allow("10.0.0.66", 8.0)


@given(sources=st.lists(st.integers(0, 10_000), max_size=200))
def test_the_bucket_table_stays_bounded(sources: list[int]) -> None:
    """However many addresses spray, at most max_sources buckets are kept."""
    limiter = SourceRateLimiter(max_sources=16)
    for i, src in enumerate(sources):
        limiter.allow(f"10.0.{src // 256}.{src % 256}", float(i))
        assert len(limiter) <= 16


@given(tokens=st.floats(0, 5), t0=st.floats(0, 100), back=st.floats(0, 100))
def test_a_clock_going_backwards_refills_nothing(tokens: float, t0: float, back: float) -> None:
    """A bucket asked about an earlier time neither refills nor moves its clock back."""
    _, after = TokenBucket(tokens, t0).take(t0 - back, rate=3.0, burst=5.0)
    assert after.tokens <= tokens and after.updated == t0


@given(sent=st.integers(0, 10_000), draw=st.floats(0, 1, exclude_max=True))
def test_beacon_delays_stay_within_jittered_bounds(sent: int, draw: float) -> None:
    """Each delay is within first_s x (1 - jitter) .. interval_s x (1 + jitter)."""
    schedule = BeaconSchedule(interval_s=5.0, first_s=0.25, jitter=0.1)
    delay = schedule.delay(sent, draw)
    assert 0.25 * 0.9 - 1e-9 <= delay <= 5.0 * 1.1 + 1e-9


def test_beacon_schedule_starts_fast_and_settles_at_the_interval() -> None:
    """Without jitter: 0.25, 0.5, 1, 2, 4, then the interval for ever."""
    schedule = BeaconSchedule(interval_s=5.0, first_s=0.25, jitter=0.0)
    assert [schedule.delay(n, 0.5) for n in range(7)] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


@pytest.mark.parametrize("kwargs", [{"first_s": 0}, {"first_s": 10, "interval_s": 5}, {"jitter": 1.0}])
def test_unusable_schedules_are_refused(kwargs: dict[str, float]) -> None:
    """BeaconSchedule validates eagerly."""
    with pytest.raises(ConfigError):
        BeaconSchedule(**kwargs)


@given(heard=st.integers(1, 5000), due=st.floats(0, ANSWER_UNLESS_DUE_S), draw=st.floats(0, 1, exclude_max=True))
def test_a_newcomer_is_never_answered_while_our_own_beacon_is_due_soon(heard: int, due: float, draw: float) -> None:
    """Our next scheduled beacon within ANSWER_UNLESS_DUE_S reaches it anyway: no extra beacon."""
    assert not answers_newcomer(heard, due, draw)
    assert not answers_newcomer(heard, due, draw, exchange=False)


def test_a_newcomer_is_answered_by_about_answerers_of_those_who_hear_it() -> None:
    """With our next beacon far off: the first few answer for sure, later ones with a chance of
    ANSWERERS / heard; without peer exchange every node answers."""
    far = ANSWER_UNLESS_DUE_S + 1
    assert all(answers_newcomer(n, far, 0.999) for n in range(1, int(ANSWERERS) + 1))
    draws = [i / 1000 for i in range(1000)]
    assert sum(answers_newcomer(30, far, d) for d in draws) == 100  # 3 / 30 of the draws
    assert all(answers_newcomer(30, far, d, exchange=False) for d in draws)


# -- the peer book --------------------------------------------------------------------------------


def _peer(node: int, ts: float) -> RelayedPeer:
    return RelayedPeer(f"node-{node}", ts, f'{{"n":{node},"t":{ts}}}'.encode())


def test_a_book_tells_new_changed_fresher_and_stale_apart() -> None:
    book = PeerBook("me", book_id="b1")
    assert book.add(_peer(1, 10.0), ("h", 1), "says-a") == NEW
    assert book.add(_peer(1, 10.0), ("h", 1), "says-a") == STALE  # not newer
    assert book.add(_peer(1, 12.0), ("h", 1), "says-a") == FRESHER
    assert book.version == 1  # under RELAY_REFRESH_S newer: replaced in place, nothing to pass on
    assert book.add(_peer(1, 10.0 + RELAY_REFRESH_S), ("h", 1), "says-a") == FRESHER
    assert book.version == 2
    assert book.add(_peer(1, 50.0), ("h", 2), "says-b") == CHANGED
    assert book.add(RelayedPeer("me", 99.0, b"{}"), None) == STALE  # ourselves
    assert book.version == 3 and len(book) == 1 and book.targets() == {"node-1": ("h", 2)}
    assert book.knows("node-1", 50.0 + RELAY_REFRESH_S - 1) and not book.knows("node-1", 50.0 + RELAY_REFRESH_S)
    assert book.knows("me", 0.0) and not book.knows("node-2", 0.0)


def test_a_full_book_forgets_the_peer_changed_longest_ago() -> None:
    book = PeerBook("me", capacity=2)
    for node in range(3):
        book.add(_peer(node, 1.0), None)
    assert sorted(book.targets()) == [] and len(book) == 2
    assert book.listing(1.0).entries[0].peer.node_id == "node-1"


def test_the_listing_leaves_out_what_is_too_old_to_pass_on() -> None:
    book = PeerBook("me")
    book.add(_peer(1, 0.0), None)
    book.add(_peer(2, 200.0), None)
    assert [e.peer.node_id for e in book.listing(now=RELAY_MAX_AGE_S + 100.0).entries] == ["node-2"]


@given(
    st.lists(st.tuples(st.integers(0, 9), st.floats(0, 1000), st.sampled_from("ab")), max_size=60),
    st.lists(st.integers(1, 8), min_size=1, max_size=30),
)
def test_following_deltas_from_any_cursor_brings_every_change(
    adds: list[tuple[int, float, str]], limits: list[int]
) -> None:
    """Whatever the adds and the limits asked, following the cursor gives each peer's entry as listed."""
    book = PeerBook("me", book_id="b")
    received: dict[str, RelayedPeer] = {}
    cursor = ("", 0)
    for i, (node, ts, said) in enumerate(adds):
        book.add(_peer(node, ts), None, said)
        if i % 7 == 0:  # catch up now and then while the book changes
            cursor = _follow(book.listing(0.0), cursor, limits, received)
    listing = book.listing(0.0)
    cursor = _follow(listing, cursor, limits, received)
    assert cursor == ("b", book.version)
    assert listing.delta("b", book.version, 8, lambda p: 1, 100) == ([], book.version)
    for entry in listing.entries:
        assert received[entry.peer.node_id].timestamp >= entry.changed_ts


def _follow(
    listing: Listing, cursor: tuple[str, int], limits: list[int], received: dict[str, RelayedPeer]
) -> tuple[str, int]:
    for step in range(len(listing.entries) + 1):
        peers, version = listing.delta(*cursor, limits[step % len(limits)], lambda p: 1, 100)
        for peer in peers:
            received[peer.node_id] = peer
        cursor = (listing.book, version)
        if version == listing.version:
            return cursor
    raise AssertionError("the cursor did not reach the listing's version")


def test_a_delta_stops_at_its_byte_budget_and_passes_over_what_never_fits() -> None:
    book = PeerBook("me", book_id="b")
    for node in range(4):
        book.add(_peer(node, 1.0), None)
    sizes = {"node-0": 40, "node-1": 500, "node-2": 40, "node-3": 40}
    listing = book.listing(1.0)
    peers, cursor = listing.delta("b", 0, 10, lambda p: sizes[p.node_id], 100)
    assert [p.node_id for p in peers] == ["node-0", "node-2"] and cursor == 3  # node-3 did not fit: next time
    peers, cursor = listing.delta("b", cursor, 10, lambda p: sizes[p.node_id], 100)
    assert [p.node_id for p in peers] == ["node-3"] and cursor == 4
    assert listing.delta("another book", 4, 1, lambda p: 1, 100) == ([book.listing(1.0).entries[0].peer], 1)


def test_pick_draws_without_repeats() -> None:
    assert pick(["a", "b", "c"], 2, lambda n: 0) == ["a", "b"]
    assert sorted(pick(["a", "b"], 5, lambda n: n - 1)) == ["a", "b"]
