"""The peer registry's whole protocol on the bus.

Told to the registry::

    PeerSeen          a sighting from anything that is not discovery (already trusted fields)
    Sighted           (sweeper.messages) signed announces found by a discovery round
    PeerAnnounced     (lan.messages) a signed LAN beacon
    EvolutionOutcome  trust +0.05 / −0.02
    ForgetPeer        drop a peer now

Asked of the registry (reply in brackets)::

    GetPeer(peer_id)                   [PeerReply]
    ListPeers()                        [PeerList]
    FindSuitablePeers(min_count, ...)  [SuitablePeersReply]
    ListRoutes(reply_to=None)          [RoutesList] (or told to reply_to)

Told by the registry to its ``routes_to`` (the retrier) when a peer's addresses
change or it expires: ``PeerRoutes`` (empty addresses = unreachable).

Capabilities travel as their JSON object text
(:meth:`~villagemesh.protocols.discovery.Capabilities.to_json`): the class
belongs to the discovery protocol, and the receiver re-validates it on parsing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from villagemesh.actors.core import codec
from villagemesh.errors import CodecError, ProtocolError
from villagemesh.protocols.discovery import Capabilities

from .state import PeerRecord

__all__ = [
    "EvolutionOutcome",
    "FindSuitablePeers",
    "ForgetPeer",
    "GetPeer",
    "ListPeers",
    "ListRoutes",
    "PeerInfo",
    "PeerList",
    "PeerReply",
    "PeerRoutes",
    "PeerSeen",
    "RoutesList",
    "SuitablePeersReply",
    "capabilities_from_text",
    "capabilities_to_text",
]


def capabilities_to_text(caps: Capabilities | None) -> str | None:
    """Capabilities as compact JSON text (None stays None)."""
    return None if caps is None else json.dumps(caps.to_json(), sort_keys=True, separators=(",", ":"))


def capabilities_from_text(text: str | None) -> Capabilities | None:
    """The inverse of :func:`capabilities_to_text`; :class:`CodecError` for anything invalid."""
    if text is None:
        return None
    try:
        return Capabilities.from_json(json.loads(text))
    except (ValueError, ProtocolError) as exc:
        raise CodecError(f"capabilities text is not valid: {exc}: {text[:120]!r}") from exc


@codec.message("registry.PeerInfo")
@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A :class:`~.state.PeerRecord` on the wire."""

    peer_id: str
    addresses: tuple[tuple[str, tuple[str, ...]], ...]
    capabilities: str | None
    public_key: bytes | None
    last_seen: float
    trust: float
    latency_ms: float | None
    source: str | None

    @classmethod
    def of(cls, rec: PeerRecord) -> PeerInfo:
        """The wire form of a record."""
        return cls(
            rec.peer_id,
            rec.addresses,
            capabilities_to_text(rec.capabilities),
            rec.public_key,
            rec.last_seen,
            rec.trust,
            rec.latency_ms,
            rec.source,
        )

    def record(self) -> PeerRecord:
        """Back to a validated record (CodecError or ConfigError when a field is invalid)."""
        return PeerRecord(
            peer_id=self.peer_id,
            addresses=self.addresses,
            capabilities=capabilities_from_text(self.capabilities),
            public_key=self.public_key,
            last_seen=self.last_seen,
            trust=self.trust,
            latency_ms=self.latency_ms,
            source=self.source,
        )


# --- told to the registry -------------------------------------------------------------------------


@codec.message("registry.PeerSeen")
@dataclass(frozen=True, slots=True)
class PeerSeen:
    """Tell: a peer was seen (for sources other than signed discovery, which arrives as Sighted).

    ``last_seen`` None means "now, by the registry's clock"; ``trust`` is never
    taken from a sighting.
    """

    peer_id: str
    addresses: tuple[str, ...]
    capabilities: str | None
    public_key: bytes | None
    latency_ms: float | None
    source: str | None
    last_seen: float | None = None


@codec.message("registry.EvolutionOutcome")
@dataclass(frozen=True, slots=True)
class EvolutionOutcome:
    """Tell: an evolution with ``peer_id`` succeeded or failed (adjusts its trust)."""

    peer_id: str
    succeeded: bool


@codec.message("registry.ForgetPeer")
@dataclass(frozen=True, slots=True)
class ForgetPeer:
    """Tell: drop ``peer_id`` from the registry and its file."""

    peer_id: str


# --- asks and replies -----------------------------------------------------------------------------


@codec.message("registry.GetPeer")
@dataclass(frozen=True, slots=True)
class GetPeer:
    """Ask: what is known of ``peer_id``? Reply: PeerReply."""

    peer_id: str


@codec.message("registry.PeerReply")
@dataclass(frozen=True, slots=True)
class PeerReply:
    """The peer, or None when unknown."""

    peer: PeerInfo | None


@codec.message("registry.ListPeers")
@dataclass(frozen=True, slots=True)
class ListPeers:
    """Ask: every known peer. Reply: PeerList."""


@codec.message("registry.PeerList")
@dataclass(frozen=True, slots=True)
class PeerList:
    """Every known peer, by id."""

    peers: tuple[PeerInfo, ...]


@codec.message("registry.FindSuitablePeers")
@dataclass(frozen=True, slots=True)
class FindSuitablePeers:
    """Ask: every peer suitable for evolution, best first (no cap). Reply: SuitablePeersReply.

    ``max_age`` None uses the registry's expiry age.
    """

    min_count: int
    max_age: float | None = None


@codec.message("registry.SuitablePeersReply")
@dataclass(frozen=True, slots=True)
class SuitablePeersReply:
    """The suitable peers by evolution priority; ``enough`` is ``len(peers) >= min_count``."""

    peers: tuple[PeerInfo, ...]
    min_count: int
    enough: bool


@codec.message("registry.ListRoutes")
@dataclass(frozen=True, slots=True)
class ListRoutes:
    """Ask: every peer's addresses per transport. Reply: RoutesList.

    As a tell with ``reply_to``, the RoutesList is told to ``reply_to`` (so an
    actor starting up need not block on an ask).
    """

    reply_to: str | None = None


@codec.message("registry.PeerRoutes")
@dataclass(frozen=True, slots=True)
class PeerRoutes:
    """A peer's addresses per transport (told to ``routes_to`` on change; empty when it expired)."""

    peer_id: str
    addresses: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def of(cls, rec: PeerRecord) -> PeerRoutes:
        """The routes of a record."""
        return cls(rec.peer_id, rec.addresses)


@codec.message("registry.RoutesList")
@dataclass(frozen=True, slots=True)
class RoutesList:
    """Every known peer's routes."""

    routes: tuple[PeerRoutes, ...]
