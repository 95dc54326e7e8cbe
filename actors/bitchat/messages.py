"""The BitChat actor's own messages on the bus (besides the transport contract of the kit).

Radio events reach the actor as :class:`RadioEvent` (posted from the radio's
thread); timers as :class:`RelayDue` and :class:`AnnounceDue`.
"""

from __future__ import annotations

from dataclasses import dataclass

from villagemesh.actors.core import codec

__all__ = ["AnnounceDue", "BitchatStatus", "GetBitchatStatus", "PeerSeen", "RelayDue"]


@codec.message("bitchat.RelayDue")
@dataclass(frozen=True, slots=True)
class RelayDue:
    """Timer: a relay's jitter ran out (the mesh state says which)."""


@codec.message("bitchat.AnnounceDue")
@dataclass(frozen=True, slots=True)
class AnnounceDue:
    """Timer: announce ourselves (BitChat announce and villagemesh announce) again."""


@codec.message("bitchat.GetStatus")
@dataclass(frozen=True, slots=True)
class GetBitchatStatus:
    """Ask: links, peers and counters."""


@codec.message("bitchat.Status")
@dataclass(frozen=True, slots=True)
class BitchatStatus:
    """What the BitChat transport sees and has counted."""

    peer_id: str
    """Our BitChat peer id (hex)."""
    radio: str
    """The radio's name, or ``unavailable: <reason>``."""
    links: tuple[str, ...]
    """Neighbours' peer ids (hex) with a link up."""
    peers: tuple[str, ...]
    """Peer ids (hex) whose signed announce we verified."""
    counters: dict[str, int]


@codec.message("bitchat.PeerSeen")
@dataclass(frozen=True, slots=True)
class PeerSeen:
    """The scanner heard a BitChat peer advertise: its peer id (service data) and BLE address."""

    peer_id: bytes
    address: str
    rssi: int
