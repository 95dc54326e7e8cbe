"""The radio a BitChat node talks through: one interface, and the deterministic in-memory implementation.

A radio has links to neighbours, each named by the neighbour's BitChat peer
id, and moves frames (one encoded packet or fragment each, at most ``mtu``
bytes) over them. What happens on the air comes back as events, through the
handler given to :meth:`Radio.start`::

    LinkUp(peer)        a link to ``peer`` is usable (BLE: connected, service found, subscribed)
    LinkDown(peer)      it is not any more (out of range, disconnected)
    Frame(peer, data)   ``peer`` sent us ``data`` on our link

The real radio (bleak central plus a D-Bus GATT server) is in :mod:`.ble`.
:class:`MemoryAir` is the fake the tests and the benchmark use: N radios, a
topology the test sets and changes (link churn), a fixed per-frame latency and
a *manual* clock: nothing happens until :meth:`MemoryAir.run` is called, and
then events happen in time order, ties broken by the order they were made, so
a run is the same every time. A frame in flight when its link goes down is lost.

``MemoryAir(live=True)`` is the same medium without the clock, for actors on
real threads: a frame or a link change reaches the other radio's handler at
once, from the sender's thread (the actor's handler only posts it to its own
mailbox), under a lock.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from villagemesh.errors import ConfigError, ConnectError

__all__ = [
    "Frame",
    "LinkDown",
    "LinkUp",
    "MemoryAir",
    "MemoryRadio",
    "Radio",
    "RadioEvent",
]


@dataclass(frozen=True)
class LinkUp:
    """A link to ``peer`` is usable."""

    peer: bytes


@dataclass(frozen=True)
class LinkDown:
    """The link to ``peer`` is gone."""

    peer: bytes


@dataclass(frozen=True)
class Frame:
    """``peer`` sent ``data``."""

    peer: bytes
    data: bytes


RadioEvent = LinkUp | LinkDown | Frame
Handler = Callable[[RadioEvent], None]


class Radio(Protocol):
    """What a BitChat node needs from its radio."""

    mtu: int
    """The largest frame a link takes in one write."""

    def start(self, handler: Handler) -> None:
        """Begin: events go to ``handler`` from now on."""

    def send(self, peer: bytes, data: bytes) -> None:
        """Write one frame to ``peer``.

        Raises:
            ConnectError: there is no link to ``peer``.
        """

    def stop(self) -> None:
        """End: no more events, links closed."""


class MemoryAir:
    """The in-memory medium: radios, the links between them and a manual clock.

    Args:
        latency: seconds a frame takes over a link.
        mtu: the frame size every radio takes.
    """

    def __init__(self, latency: float = 0.005, mtu: int = 512, *, live: bool = False) -> None:
        if not latency > 0:
            raise ConfigError(f"latency must be > 0 seconds, got {latency!r}")
        self.latency = latency
        self.mtu = mtu
        self.now = 0.0
        self.frames = 0
        """Frames put on the air so far (one per link write)."""
        self.lost = 0
        """Frames whose link went down while they were in flight."""
        self._radios: dict[bytes, MemoryRadio] = {}
        self._links: set[frozenset[bytes]] = set()
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = 0
        self.live = live
        self._lock = threading.RLock()

    def radio(self, peer: bytes) -> MemoryRadio:
        """The radio of node ``peer`` (made on first use)."""
        if peer not in self._radios:
            self._radios[peer] = MemoryRadio(self, peer)
        return self._radios[peer]

    def linked(self, a: bytes, b: bytes) -> bool:
        """Whether ``a`` and ``b`` are in range."""
        return frozenset((a, b)) in self._links

    def neighbours(self, peer: bytes) -> list[bytes]:
        """Who ``peer`` is linked to, sorted."""
        return sorted(other for other in self._radios if other != peer and self.linked(peer, other))

    def set_link(self, a: bytes, b: bytes, up: bool) -> None:
        """Put ``a`` and ``b`` in range (or out of it); both radios hear of it now, ``a`` first."""
        pair = frozenset((a, b))
        with self._lock:
            if (pair in self._links) == up:
                return
            if up:
                self._links.add(pair)
            else:
                self._links.discard(pair)
        event = LinkUp if up else LinkDown
        self.call_at(self.now, lambda: self.radio(a).hear(event(b)))
        self.call_at(self.now, lambda: self.radio(b).hear(event(a)))

    def call_at(self, when: float, action: Callable[[], None]) -> None:
        """Run ``action`` when the clock reaches ``when`` (never earlier than now); live: at once."""
        if self.live:
            with self._lock:
                action()
            return
        heapq.heappush(self._events, (max(when, self.now), self._sequence, action))
        self._sequence += 1

    def transmit(self, source: bytes, destination: bytes, data: bytes) -> None:
        """One frame from ``source`` to ``destination``, arriving after the latency if the link lasts.

        Raises:
            ConnectError: the two are not in range.
        """
        if not self.linked(source, destination):
            raise ConnectError(f"no link from {source.hex()} to {destination.hex()}")
        self.frames += 1

        def arrive() -> None:
            if self.linked(source, destination):
                self.radio(destination).hear(Frame(source, data))
            else:
                self.lost += 1

        self.call_at(self.now + self.latency, arrive)

    def run(self, until: float | None = None) -> int:
        """Advance the clock through every event due by ``until`` (all of them if None); how many ran."""
        ran = 0
        while self._events and (until is None or self._events[0][0] <= until):
            when, _, action = heapq.heappop(self._events)
            self.now = when
            action()
            ran += 1
        if until is not None and until > self.now:
            self.now = until
        return ran


class MemoryRadio:
    """One node's radio on a :class:`MemoryAir`."""

    def __init__(self, air: MemoryAir, peer: bytes) -> None:
        self.air = air
        self.peer = peer
        self.mtu = air.mtu
        self._handler: Handler | None = None

    def start(self, handler: Handler) -> None:
        """Events go to ``handler``; links already up are reported at once."""
        self._handler = handler
        for other in self.air.neighbours(self.peer):
            handler(LinkUp(other))

    def send(self, peer: bytes, data: bytes) -> None:
        """One frame to ``peer`` (see :meth:`MemoryAir.transmit`)."""
        self.air.transmit(self.peer, peer, data)

    def stop(self) -> None:
        """No more events."""
        self._handler = None

    def hear(self, event: RadioEvent) -> None:
        """An event from the air (dropped while stopped)."""
        if self._handler is not None:
            self._handler(event)
