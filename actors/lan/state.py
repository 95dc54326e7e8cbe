"""LAN discovery's pure core: per-source rate limiting and the beacon schedule.

No sockets, no clock: every function takes ``now`` (monotonic seconds) or a
random draw as an argument, so hypothesis can drive them.

Rate limiting (:class:`SourceRateLimiter`) is a token bucket per source
address: ``burst`` tokens, refilled at ``rate`` per second; a beacon costs one.
A flood from one address is cut to ``rate``/s after ``burst`` beacons while
other sources are untouched. The table of buckets is bounded
(``max_sources``): the least recently seen source is forgotten first, so a
spray of fake addresses costs memory O(max_sources), and a forgotten source
merely starts again with a full bucket.

Schedule (:class:`BeaconSchedule`): a node that just started beacons quickly,
so neighbours find it in well under a second, then backs off to the steady
interval; every delay is jittered so nodes started together do not beacon in
lock-step::

    beacon #   0     1     2     3     4 ...
    delay      0.25  0.5   1     2     4 → capped at interval_s (5 s), each × (1 ± jitter)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from villagemesh.errors import ConfigError

__all__ = [
    "BEACON_INTERVAL_S",
    "BURST",
    "MAX_SOURCES",
    "RATE_PER_S",
    "BeaconSchedule",
    "SourceRateLimiter",
    "TokenBucket",
]

RATE_PER_S = 2.0
"""Beacons per second accepted from one source: an honest node sends one per interval (5 s)."""

BURST = 8.0
"""Back-to-back beacons accepted from one source: a fresh node's fast start, plus restarts."""

MAX_SOURCES = 4096
"""Buckets kept at once: a LAN has far fewer hosts; bounds memory under address spraying."""

BEACON_INTERVAL_S = 5.0
"""Steady beacon period: a departed peer's entry ages out within a few periods."""


@dataclass(frozen=True, slots=True)
class TokenBucket:
    """An immutable token bucket: ``tokens`` left as of ``updated`` (seconds)."""

    tokens: float
    updated: float

    def take(self, now: float, rate: float, burst: float) -> tuple[bool, TokenBucket]:
        """Refill to ``now`` and try to take one token: ``(allowed, new bucket)``.

        A clock that goes backwards refills nothing (never a negative refill).
        """
        elapsed = max(0.0, now - self.updated)
        tokens = min(burst, self.tokens + elapsed * rate)
        updated = max(now, self.updated)
        if tokens >= 1.0:
            return True, TokenBucket(tokens - 1.0, updated)
        return False, TokenBucket(tokens, updated)


class SourceRateLimiter:
    """A :class:`TokenBucket` per source address, at most ``max_sources`` of them."""

    def __init__(self, rate: float = RATE_PER_S, burst: float = BURST, max_sources: int = MAX_SOURCES) -> None:
        if not rate > 0 or not burst >= 1 or max_sources < 1:
            raise ConfigError(f"need rate > 0, burst >= 1, max_sources >= 1; got {rate!r}, {burst!r}, {max_sources!r}")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, source: str, now: float) -> bool:
        """Whether one more beacon from ``source`` at ``now`` is within its rate (and count it)."""
        bucket = self._buckets.pop(source, None) or TokenBucket(self.burst, now)
        allowed, self._buckets[source] = bucket.take(now, self.rate, self.burst)
        if len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True, slots=True)
class BeaconSchedule:
    """Delays between beacons: a fast start doubling up to ``interval_s``, each jittered."""

    interval_s: float = BEACON_INTERVAL_S
    first_s: float = 0.25
    jitter: float = 0.1
    """Fraction: each delay is multiplied by a factor within ``1 ± jitter``."""

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.interval_s or not 0 <= self.jitter < 1:
            raise ConfigError(
                f"need 0 < first_s <= interval_s and 0 <= jitter < 1; got {self.first_s!r}, "
                f"{self.interval_s!r}, {self.jitter!r}"
            )

    def delay(self, sent: int, draw: float) -> float:
        """Seconds to wait after beacon number ``sent`` (0-based); ``draw`` is uniform in [0, 1)."""
        base = min(self.interval_s, self.first_s * 2.0 ** min(sent, 64))
        return base * (1.0 + self.jitter * (2.0 * draw - 1.0))
