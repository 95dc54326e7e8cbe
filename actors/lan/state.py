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

Peer book (:class:`PeerBook`): the newest verified announce or response of
each peer this node heard of, by whatever way (beacon, probe, peer exchange),
kept to pass on (peer exchange) and to pick whom to ask next. It remembers
what it verified, so a relayed entry that is not clearly newer than what the
book holds (``RELAY_REFRESH_S``) costs no signature check. Its version counts
the changes worth passing on (a new peer, a changed one, a copy
``RELAY_REFRESH_S`` newer than the last passed on), and a :class:`Listing`
hands out the changes after a cursor, so exchanges carry deltas. Bounded (``capacity``; the least recently updated
peer is forgotten first); entries older than ``max_age`` are not passed on.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from villagemesh.errors import ConfigError
from villagemesh.protocols.discovery import RelayedPeer

__all__ = [
    "ANSWERERS",
    "ANSWER_UNLESS_DUE_S",
    "BEACON_INTERVAL_S",
    "BOOK_CAPACITY",
    "BURST",
    "CHANGED",
    "FRESHER",
    "MAX_SOURCES",
    "NEW",
    "RATE_PER_S",
    "RELAY_MAX_AGE_S",
    "RELAY_REFRESH_S",
    "STALE",
    "BeaconSchedule",
    "BookEntry",
    "Listing",
    "PeerBook",
    "SourceRateLimiter",
    "TokenBucket",
    "answers_newcomer",
    "pick",
]

RATE_PER_S = 2.0
"""Beacons per second accepted from one source: an honest node sends one per interval (5 s)."""

BURST = 8.0
"""Back-to-back beacons accepted from one source: a fresh node's fast start, plus restarts."""

MAX_SOURCES = 4096
"""Buckets kept at once: a LAN has far fewer hosts; bounds memory under address spraying."""

BOOK_CAPACITY = 4096
"""Peers a book holds: far more than a LAN; bounds memory under a flood of fresh keys."""

RELAY_REFRESH_S = 30.0
"""A relayed announce is news only if at least this much newer than the book's: peers re-sign
their answers every second, and verifying each newer copy of an unchanged announce would cost a
signature check per entry per exchange. Peers heard directly (beacon, probe) refresh at once."""

RELAY_MAX_AGE_S = 300.0
"""An announce older than this (by its own timestamp) is not passed on: the registry's default
max_age, so a departed peer stops being relayed when it would expire anyway."""

BEACON_INTERVAL_S = 5.0
"""Steady beacon period: a departed peer's entry ages out within a few periods."""

ANSWERERS = 3.0
"""How many of the nodes that hear a newcomer's beacon answer it, on average (peer exchange
tells the newcomer about the others)."""

ANSWER_UNLESS_DUE_S = 1.0
"""A newcomer is not answered when our own next beacon is due within this many seconds: it hears
us that soon anyway. When a whole LAN comes up at once (every cable plugged in together) every
node is in its fast start and every peer is a newcomer; answering then doubled the beacons
(measured at 50 hosts: 282 answers beside 188 scheduled beacons, and half of all beacon
datagrams dropped by full receive buffers)."""


def answers_newcomer(heard: int, next_beacon_in: float, draw: float, *, exchange: bool = True) -> bool:
    """Whether hearing a node never heard before should make us beacon at once (mDNS-style).

    ``heard``: the nodes heard so far, the newcomer included; ``next_beacon_in``: seconds until our
    next scheduled beacon; ``draw``: uniform in [0, 1). With peer exchange a newcomer that hears a
    few of us learns the rest from them, so each node answers with a chance of
    ``ANSWERERS / heard``: a newcomer costs O(N) beacons heard, not O(N^2). Without exchange,
    everyone answers."""
    if next_beacon_in <= ANSWER_UNLESS_DUE_S:
        return False
    chance = min(1.0, ANSWERERS / max(1, heard)) if exchange else 1.0
    return draw < chance


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


@dataclass(frozen=True, slots=True)
class BookEntry:
    """A peer's newest verified announce or response: its signed body and where to probe it."""

    peer: RelayedPeer
    target: tuple[str, int] | None
    """The acceptor ``(host, port)`` it advertises, if any (``ws://`` or ``tcp://``)."""
    said: object = None
    """What it says of itself (addresses, capabilities): a change is news, a fresher copy is not."""
    changed: int = 0
    """The book version at which this entry last changed in a way worth passing on."""
    changed_ts: float = 0.0
    """The entry's timestamp then: a copy RELAY_REFRESH_S newer is passed on again."""


NEW, CHANGED, FRESHER, STALE = "new", "changed", "fresher", "stale"
"""What :meth:`PeerBook.add` found: a peer new to the book, one that now says something else, a
newer copy of what it said, or nothing newer than the book's (dropped)."""


@dataclass(frozen=True, slots=True)
class Listing:
    """A snapshot of a book to pass on from another thread: entries by ascending ``changed``."""

    book: str
    version: int
    entries: tuple[BookEntry, ...]

    def delta(
        self, book: str, since: int, limit: int, size_of: Callable[[RelayedPeer], int], budget: int
    ) -> tuple[list[RelayedPeer], int]:
        """The oldest entries changed after ``since`` (after 0 if ``book`` is not this book's id)
        that fit ``limit`` entries and ``budget`` bytes (``size_of`` each), and the cursor to
        continue from. An entry bigger than the whole budget is passed over, never sent."""
        if book != self.book:
            since = 0
        newer: list[BookEntry] = []
        for entry in reversed(self.entries):
            if entry.changed <= since:
                break
            newer.append(entry)
        newer.reverse()
        chosen: list[RelayedPeer] = []
        used, cursor = 0, since
        for entry in newer:
            size = size_of(entry.peer)
            if size <= budget:
                if len(chosen) >= limit or used + size > budget:
                    return chosen, cursor
                chosen.append(entry.peer)
                used += size
            cursor = entry.changed
        return chosen, self.version


class PeerBook:
    """Newest verified announce per peer, in the order they last changed (see the module docstring)."""

    def __init__(self, own_id: str, capacity: int = BOOK_CAPACITY, *, book_id: str = "") -> None:
        if capacity < 1:
            raise ConfigError(f"a peer book needs capacity >= 1, got {capacity!r}")
        self.own_id = own_id
        self.capacity = capacity
        self.book_id = book_id
        """Names this book in cursors (random per book: a restarted node's cursors start over)."""
        self._entries: OrderedDict[str, BookEntry] = OrderedDict()
        self.version = 0
        """Grows with every change worth passing on (a cursor is a version of this book)."""

    def knows(self, node_id: str, timestamp: float, refresh: float = RELAY_REFRESH_S) -> bool:
        """Whether a relayed announce of ``node_id`` at ``timestamp`` tells nothing new: ours, or
        not ``refresh`` seconds newer than the book's."""
        entry = self._entries.get(node_id)
        return node_id == self.own_id or (entry is not None and timestamp - entry.peer.timestamp < refresh)

    def add(self, peer: RelayedPeer, target: tuple[str, int] | None, said: object = None) -> str:
        """Keep ``peer`` (already verified) if newer than what we hold: :data:`NEW`,
        :data:`CHANGED` (``said`` differs), :data:`FRESHER`, or :data:`STALE` (not kept).

        A change, or a copy RELAY_REFRESH_S newer than the last one passed on, moves the
        entry to the end with a new version; a fresher copy short of that replaces it in place.
        """
        old = self._entries.get(peer.node_id)
        if peer.node_id == self.own_id or (old is not None and old.peer.timestamp >= peer.timestamp):
            return STALE
        found = NEW if old is None else FRESHER if old.said == said else CHANGED
        if old is not None and found == FRESHER and peer.timestamp - old.changed_ts < RELAY_REFRESH_S:
            self._entries[peer.node_id] = BookEntry(peer, target, said, old.changed, old.changed_ts)
            return found
        self.version += 1
        self._entries.pop(peer.node_id, None)
        self._entries[peer.node_id] = BookEntry(peer, target, said, self.version, peer.timestamp)
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return found

    def listing(self, now: float, max_age: float = RELAY_MAX_AGE_S) -> Listing:
        """What to pass on: every entry not older than ``max_age`` (by its own timestamp)."""
        fresh = tuple(e for e in self._entries.values() if now - e.peer.timestamp <= max_age)
        return Listing(self.book_id, self.version, fresh)

    def targets(self, node_ids: list[str] | None = None) -> dict[str, tuple[str, int]]:
        """Probe targets by node id: of ``node_ids`` (those in the book), or of every peer."""
        wanted = self._entries.keys() if node_ids is None else node_ids
        out: dict[str, tuple[str, int]] = {}
        for node_id in wanted:
            entry = self._entries.get(node_id)
            if entry is not None and entry.target is not None:
                out[node_id] = entry.target
        return out

    def __len__(self) -> int:
        return len(self._entries)


def pick(candidates: list[str], k: int, draw: Callable[[int], int]) -> list[str]:
    """Up to ``k`` of ``candidates`` without repeats; ``draw(n)`` returns a uniform index in ``[0, n)``."""
    pool = list(candidates)
    chosen: list[str] = []
    while pool and len(chosen) < k:
        chosen.append(pool.pop(draw(len(pool))))
    return chosen
