"""Runtime metrics, counted where the work happens, read by whoever asks (the status endpoint).

One :class:`Metrics` per bus. Each count has one writer, so none takes a lock::

    Sender.sent[to]            messages this sender put in ``to``'s mailbox    the sender's thread
    ActorMetrics.received      messages the actor took from its mailbox        the actor's thread
    ActorMetrics.latency       seconds of each ask to the actor (last LATENCY)  deque.append: thread-safe
    ActorMetrics.counters[k]   an actor's own counts (transmit_failed, ...)    the actor's thread

The figures outlive actor instances (a restart does not zero them): an
:class:`ActorMetrics` belongs to the bus, like the mailbox, and a sender that
closes folds its counts into the bus's ``retired`` totals. Reading happens in
another thread: it copies each dict (one C call, atomic under the GIL) and sums.

``mailbox depth`` is what was put in minus what was taken out: a count of
messages queued in ZeroMQ's pipes, which ZeroMQ itself does not expose. It is
approximate by the messages a crashed instance had taken but not finished (they
go back to the mailbox's redelivery queue and are counted again when read).

The cost: a dict update per frame sent (per batch, not per message, inside an
actor), an integer add per frame received, two clock reads per ask; measured by
``benchmarks/bus_throughput.py --metrics`` (docs/benchmarks.md). ``Bus(metrics=False)``
turns it off.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

__all__ = ["LATENCY", "ActorMetrics", "Metrics", "percentile"]

LATENCY = 1_024
"""Ask latencies kept per actor (the percentiles speak of the last this many asks)."""


class ActorMetrics:
    """The figures of one actor name on one bus (any instance)."""

    __slots__ = ("counters", "latency", "name", "received")

    def __init__(self, name: str) -> None:
        self.name = name
        self.received = 0
        self.latency: collections.deque[float] = collections.deque(maxlen=LATENCY)
        self.counters: dict[str, int] = {}

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to the actor's own counter ``key`` (from the actor's thread)."""
        self.counters[key] = self.counters.get(key, 0) + n


class Metrics:
    """Every actor's figures on one bus."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._actors: dict[str, ActorMetrics] = {}
        self._senders: list[Any] = []
        self._retired_sent: dict[str, int] = {}
        self._retired_out: dict[str, int] = {}
        self._lock = threading.Lock()

    def actor(self, name: str) -> ActorMetrics:
        """The figures of ``name`` (made on first use)."""
        found = self._actors.get(name)
        if found is None:
            with self._lock:
                found = self._actors.setdefault(name, ActorMetrics(name))
        return found

    def add_sender(self, sender: Any) -> None:
        """Count what ``sender`` sends (its ``owner`` and ``sent``) from now on."""
        with self._lock:
            self._senders.append(sender)

    def retire_sender(self, sender: Any) -> None:
        """``sender`` closed: keep its counts in the totals."""
        with self._lock:
            if sender in self._senders:
                self._senders.remove(sender)
            sent = dict(sender.sent)
            for to, n in sent.items():
                self._retired_sent[to] = self._retired_sent.get(to, 0) + n
            owner = sender.owner
            self._retired_out[owner] = self._retired_out.get(owner, 0) + sum(sent.values())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per actor name: ``in``, ``out``, ``depth``, ``asks``, ``ask_p50_ms``, ``ask_p99_ms``, its counters."""
        with self._lock:
            senders = list(self._senders)
            sent_to = dict(self._retired_sent)
            out_by = dict(self._retired_out)
            actors = list(self._actors.values())
        for sender in senders:
            counts = dict(sender.sent)
            owner = sender.owner
            out_by[owner] = out_by.get(owner, 0) + sum(counts.values())
            for to, n in counts.items():
                sent_to[to] = sent_to.get(to, 0) + n
        rows: dict[str, dict[str, Any]] = {}
        for figures in actors:
            if figures.name.startswith("_"):
                continue
            latency = sorted(figures.latency)
            rows[figures.name] = {
                "in": figures.received,
                "out": out_by.get(figures.name, 0),
                "depth": max(0, sent_to.get(figures.name, 0) - figures.received),
                "asks": len(latency),
                "ask_p50_ms": _ms(percentile(latency, 50)),
                "ask_p99_ms": _ms(percentile(latency, 99)),
                **dict(figures.counters),
            }
        for name, n in out_by.items():
            if name not in rows and not name.startswith("client-"):
                rows[name] = {"in": 0, "out": n, "depth": 0, "asks": 0, "ask_p50_ms": None, "ask_p99_ms": None}
        return rows


def percentile(ordered: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when it is empty)."""
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
