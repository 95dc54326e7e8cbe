"""The LAN discovery actor's whole protocol on the bus.

Announces and responses travel as their signed JSON bodies as well as the
fields a registry indexes, so a receiver can verify them again
(:func:`~villagemesh.protocols.discovery.decode_discovery`) without trusting this actor.
"""

from __future__ import annotations

from dataclasses import dataclass

from villagemesh.actors.core import codec

__all__ = ["GetLanStatus", "LanStatus", "PeerAnnounced", "PeerProbed", "ProbeFailed", "ProbePeer"]


@codec.message("lan.PeerAnnounced")
@dataclass(frozen=True, slots=True)
class PeerAnnounced:
    """A verified beacon of another node (told to the configured ``peers_to``)."""

    node_id: str
    addresses: tuple[str, ...]
    source: str
    announce: bytes


@codec.message("lan.ProbePeer")
@dataclass(frozen=True, slots=True)
class ProbePeer:
    """Tell: ask ``host:port`` who it is (TCP discovery JSON); the outcome goes to ``reply_to``."""

    host: str
    port: int
    timeout: float
    reply_to: str


@codec.message("lan.PeerProbed")
@dataclass(frozen=True, slots=True)
class PeerProbed:
    """The peer at ``host:port`` answered with a verified response in ``latency_ms``."""

    host: str
    port: int
    node_id: str
    addresses: tuple[str, ...]
    latency_ms: float
    response: bytes


@codec.message("lan.ProbeFailed")
@dataclass(frozen=True, slots=True)
class ProbeFailed:
    """The probe failed: ``error`` is the exception class (ConnectError, TransportTimeout, RemoteProtocolError)."""

    host: str
    port: int
    error: str
    reason: str


@codec.message("lan.GetStatus")
@dataclass(frozen=True, slots=True)
class GetLanStatus:
    """Ask: how are beacons going?"""


@codec.message("lan.Status")
@dataclass(frozen=True, slots=True)
class LanStatus:
    """Beacon mode (multicast | broadcast) and counters of the beacon, the discovery responder and
    peer exchange (``known``: entries skipped unverified, ``learned``, ``rejected``, ``pull_failed``)."""

    mode: str
    beacon: dict[str, int]
    responder: dict[str, int]
    exchange: dict[str, int]
