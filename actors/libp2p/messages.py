"""The libp2p actor's own messages (besides the transport contract's, in the kit)."""

from __future__ import annotations

from dataclasses import dataclass

from villagemesh.actors.core import codec

__all__ = ["GetLibp2pStatus", "Libp2pStatus"]


@codec.message("libp2p.GetStatus")
@dataclass(frozen=True, slots=True)
class GetLibp2pStatus:
    """Ask: who is this node on libp2p, whom is it connected to, what has it counted?"""


@codec.message("libp2p.Status")
@dataclass(frozen=True, slots=True)
class Libp2pStatus:
    """The actor's peer id and address, its connected peers (node ids), and its counters."""

    peer_id: str
    address: str
    peers: tuple[str, ...]
    counts: dict[str, int]
