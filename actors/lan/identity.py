"""What this node says about itself on discovery: key, addresses, capabilities, port.

One value shared by the TCP responder (:mod:`.tcp`) and the UDP beacon
(:mod:`.beacon`): each answer or beacon is signed afresh with the current
``clock()`` so a peer can judge its freshness.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nacl.signing import SigningKey

from villagemesh.protocols.discovery import (
    Announce,
    Capabilities,
    DiscoveryResponse,
    LegacyPeerDiscovery,
    node_id_from_public_key,
    sign_announce,
    sign_response,
)

__all__ = ["Identity"]


@dataclass(frozen=True)
class Identity:
    """What this node says about itself: key, addresses, capabilities, and the legacy port."""

    signing_key: SigningKey
    addresses: tuple[str, ...]
    capabilities: Capabilities
    port: int
    """The acceptor's port, sent as ``sender_port`` to legacy clients."""
    clock: Callable[[], float] = field(default=time.time, compare=False)

    @property
    def node_id(self) -> str:
        """Our node id, derived from the key."""
        return node_id_from_public_key(bytes(self.signing_key.verify_key))

    def response(self) -> DiscoveryResponse:
        """A freshly signed response."""
        return sign_response(
            self.signing_key, addresses=self.addresses, capabilities=self.capabilities, timestamp=self.clock()
        )

    def announce(self) -> Announce:
        """A freshly signed announce (the LAN beacon's payload)."""
        return sign_announce(
            self.signing_key, addresses=self.addresses, capabilities=self.capabilities, timestamp=self.clock()
        )

    def legacy_response(self) -> LegacyPeerDiscovery:
        """The unsigned answer a legacy client understands."""
        return LegacyPeerDiscovery(
            sender_id=self.node_id, sender_port=self.port, timestamp=self.clock(), capabilities=self.capabilities
        )
