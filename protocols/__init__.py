"""villagemesh.protocols: the wire protocols, sans-I/O (no sockets, threads, clocks or actors).

Every protocol object takes bytes and gives typed events, and turns events into
bytes; the transports and actors do the I/O (h11's design). A test walks these
modules' imports and fails on socket, zmq, pykka, threading, asyncio, time,
select(ors), subprocess, multiprocessing or villagemesh's actor packages.

============================= ===============================================================
module                        what it is
============================= ===============================================================
:mod:`.sniff`                 ``sniff(prefix) -> Sniffed``: which protocol a connection speaks,
                              from at most ``MAX_SNIFF_BYTES`` bytes, never consuming them
:mod:`.envelope`              ``Message`` (alias ``UnifiedMessage``), its compact binary codec
                              and ``FrameDecoder`` for streams
:mod:`.discovery`             discovery v1: length-prefixed JSON, Ed25519-signed announces and
                              responses, the legacy ``PEER_DISCOVERY`` behind a flag
:mod:`.noise`                 the secure channel: Noise XX with Ed25519 identities
:mod:`.framing`               the shared length-prefix reader and ``NEED_DATA``
:mod:`.sphinx`                Sphinx mix packets for BetaNet: X25519, BLAKE2b KDF, ChaCha20,
                              LIONESS payloads, SURB replies, a replay cache (a package)
:mod:`.libp2p`                libp2p's wire basics: uvarints, multistream-select 1.0, peer ids
                              (identity / sha256 multihash, base58btc, CIDv1), multiaddrs
:mod:`.strategies`            hypothesis strategies for every message type (imported on its
                              own: ``from villagemesh.protocols import strategies``)
============================= ===============================================================

Errors: a peer breaking a protocol's rules raises
:class:`~villagemesh.errors.RemoteProtocolError`; asking a protocol object for
something the rules forbid raises :class:`~villagemesh.errors.LocalProtocolError`.
Nothing else escapes a decoder: that is a hypothesis property of every codec
here (tests/protocols).
"""

from __future__ import annotations

from .discovery import (
    Announce,
    Capabilities,
    DiscoveryConnection,
    DiscoveryRequest,
    DiscoveryResponse,
    LegacyPeerDiscovery,
    node_id_from_public_key,
    sign_announce,
    sign_response,
    verify,
)
from .envelope import (
    FrameDecoder,
    Message,
    Priority,
    UnifiedMessage,
    decode_message,
    encode_message,
    frame_message,
)
from .framing import NEED_DATA
from .noise import Data, HandshakeComplete, SecureChannel
from .sniff import MAX_SNIFF_BYTES, Sniffed, sniff

__all__ = [
    "MAX_SNIFF_BYTES",
    "NEED_DATA",
    "Announce",
    "Capabilities",
    "Data",
    "DiscoveryConnection",
    "DiscoveryRequest",
    "DiscoveryResponse",
    "FrameDecoder",
    "HandshakeComplete",
    "LegacyPeerDiscovery",
    "Message",
    "Priority",
    "SecureChannel",
    "Sniffed",
    "UnifiedMessage",
    "decode_message",
    "encode_message",
    "frame_message",
    "node_id_from_public_key",
    "sign_announce",
    "sign_response",
    "sniff",
    "verify",
]
