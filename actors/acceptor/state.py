"""The acceptor's pure core: limits, per-source caps and the routing table.

Nothing here touches a socket or a clock; :mod:`.server` calls in.

Rules
-----
1. **A connection is undecided until the sniffer decides.** While undecided it
   costs the acceptor a buffer of at most ``MAX_SNIFF_BYTES`` and a timer; it
   counts against its source's cap and the total cap. Once routed, it is the
   handler's (an in-loop handler's connection keeps counting until it closes;
   a cross-thread hand-off stops counting at hand-off: the adopting loop owns
   its limits).
2. **Routing is a table**, :data:`ROUTES`: every :class:`Sniffed` verdict maps
   to a :class:`Route` or to a :class:`Reject` with the reason logged. A verdict
   missing from the table is a bug in this module, caught by a test that walks
   the enum.
3. **A route without a registered handler is a rejection**, with its own
   reason (``no handler for route tls``), never a silent close.

Limits (each with the reason it is what it is)::

    SNIFF_TIMEOUT_S        5.0   slowloris bound: every protocol we speak sends its
                                 first bytes at once; 5 s covers a slow radio link
    MAX_PER_SOURCE         64    one host rarely needs more than a few parallel
                                 connections; 64 leaves room for NAT'd neighbours
    MAX_TOTAL              1024  bounds memory and file descriptors: 1024 × (sniff
                                 buffer + timer) is well under 10 MiB
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from villagemesh.actors.core.handoff import Route
from villagemesh.errors import ConfigError
from villagemesh.protocols.sniff import Sniffed

__all__ = [
    "MAX_PER_SOURCE",
    "MAX_TOTAL",
    "ROUTES",
    "SNIFF_TIMEOUT_S",
    "AcceptorLimits",
    "ConnectionLimiter",
    "Reject",
    "route_for",
    "routing_plan",
]

SNIFF_TIMEOUT_S = 5.0
"""Seconds a client has to send enough bytes for a verdict (the slowloris bound)."""

MAX_PER_SOURCE = 64
"""Connections one source address may hold in the acceptor's care at once."""

MAX_TOTAL = 1024
"""Connections the acceptor holds at once, all sources together."""


@dataclass(frozen=True, slots=True)
class Reject:
    """The verdict closes the connection; ``reason`` is logged."""

    reason: str


ROUTES: dict[Sniffed, Route | Reject | None] = {
    Sniffed.DISCOVERY_JSON: Route.DISCOVERY,
    Sniffed.SECURE: Route.SECURE,
    Sniffed.LIBP2P_MULTISTREAM: Route.LIBP2P,
    Sniffed.HTTP: Route.HTTP,
    Sniffed.TLS: Route.TLS,
    Sniffed.UNKNOWN: Reject("unknown protocol"),
    Sniffed.NEED_MORE: None,
}
"""Verdict → route, rejection, or ``None`` (wait for more bytes)."""


def routing_plan(handled: set[Route] | frozenset[Route]) -> dict[Sniffed, Route | Reject | None]:
    """:data:`ROUTES` with every route that has no handler in ``handled`` turned into a rejection."""
    plan: dict[Sniffed, Route | Reject | None] = {}
    for verdict, decision in ROUTES.items():
        if isinstance(decision, Route) and decision not in handled:
            plan[verdict] = Reject(f"no handler for route {decision.value}")
        else:
            plan[verdict] = decision
    return plan


def route_for(verdict: Sniffed, *, buffered: int, max_sniff_bytes: int) -> Route | Reject | None:
    """The routing decision for ``verdict`` after ``buffered`` bytes.

    ``None`` means wait for more bytes; a full sniff buffer that is still
    undecided is a rejection (the sniffer promised a verdict by then).
    """
    decision = ROUTES[verdict]
    if decision is None and buffered >= max_sniff_bytes:
        return Reject(f"no verdict within {max_sniff_bytes} bytes")
    return decision


@dataclass(frozen=True, slots=True)
class AcceptorLimits:
    """The acceptor's limits as one value (tests shorten the timeout)."""

    sniff_timeout_s: float = SNIFF_TIMEOUT_S
    max_per_source: int = MAX_PER_SOURCE
    max_total: int = MAX_TOTAL

    def __post_init__(self) -> None:
        if not self.sniff_timeout_s > 0:
            raise ConfigError(f"sniff_timeout_s must be > 0, got {self.sniff_timeout_s!r}")
        if self.max_per_source < 1:
            raise ConfigError(f"max_per_source must be >= 1, got {self.max_per_source!r}")
        if self.max_total < self.max_per_source:
            raise ConfigError(f"max_total ({self.max_total!r}) must be >= max_per_source ({self.max_per_source!r})")


class ConnectionLimiter:
    """Counts open connections per source address and in total, against caps.

    ``try_open(src)`` admits a connection (and counts it) or refuses it;
    ``close(src)`` releases one. Invariants: ``total == sum(per-source)``,
    no count goes above its cap, no count goes below zero, and a source with
    no connections is forgotten (memory stays bounded by ``max_total``).
    """

    def __init__(self, max_per_source: int = MAX_PER_SOURCE, max_total: int = MAX_TOTAL) -> None:
        if max_per_source < 1 or max_total < 1:
            raise ConfigError(f"caps must be >= 1, got per-source {max_per_source!r}, total {max_total!r}")
        self.max_per_source = max_per_source
        self.max_total = max_total
        self._open: Counter[str] = Counter()
        self._total = 0

    @property
    def total(self) -> int:
        """Connections counted now, all sources together."""
        return self._total

    def count(self, src: str) -> int:
        """Connections counted now for ``src``."""
        return self._open.get(src, 0)

    def refusal(self, src: str) -> str | None:
        """Why ``try_open(src)`` would refuse now, or ``None`` if it would admit."""
        if self._total >= self.max_total:
            return f"total cap {self.max_total} reached"
        if self._open.get(src, 0) >= self.max_per_source:
            return f"per-source cap {self.max_per_source} reached for {src}"
        return None

    def try_open(self, src: str) -> bool:
        """Count a new connection from ``src``; False (and nothing counted) when a cap is hit."""
        n = self._open.get(src, 0)
        if self._total >= self.max_total or n >= self.max_per_source:
            return False
        self._open[src] = n + 1
        self._total += 1
        return True

    def close(self, src: str) -> None:
        """Release one connection of ``src``; releasing one never opened is a bug (ConfigError)."""
        n = self._open.get(src, 0)
        if n <= 0:
            raise ConfigError(f"close({src!r}) without a matching try_open")
        if n == 1:
            del self._open[src]
        else:
            self._open[src] = n - 1
        self._total -= 1
