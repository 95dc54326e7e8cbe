"""The acceptor's pure core: limits, per-source caps and the routing table.

Nothing here touches a socket or a clock; :mod:`.server` calls in.

Rules
-----
1. **A connection counts from its accept until it closes, whoever owns it.**
   While undecided it costs the acceptor a buffer of at most ``MAX_SNIFF_BYTES``
   and a timer; it counts against its source's cap and the total cap. Once
   routed, it is the handler's, and it keeps counting: an in-loop handler's
   connection until it closes, a cross-thread hand-off's slot travels with it
   and the adopting loop releases it when the connection is lost
   (:class:`~villagemesh.actors.core.handoff.ConnectionLimiter`, one per node).
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

from dataclasses import dataclass

from villagemesh.actors.core.handoff import ConnectionLimiter, Route
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
