"""LAN discovery's pure core: token buckets per source and the beacon schedule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from villagemesh.actors.lan.state import BeaconSchedule, SourceRateLimiter, TokenBucket
from villagemesh.errors import ConfigError

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
