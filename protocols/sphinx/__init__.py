"""Sphinx, the mix packet format of the BetaNet transport: sans-I/O, built on PyNaCl and hashlib.

:mod:`.packet` has the format, the processing rules and the limits (its
docstring); :mod:`.crypto` the primitives (X25519, BLAKE2b KDF, ChaCha20 stream,
LIONESS). Hypothesis strategies: :func:`villagemesh.protocols.strategies.sphinx_paths`
and :func:`~villagemesh.protocols.strategies.sphinx_messages`.
"""

from __future__ import annotations

from .packet import (
    HEADER_BYTES,
    MAX_DELAY_MS,
    MAX_EPOCH,
    MAX_HOPS,
    MAX_MESSAGE,
    PACKET_BYTES,
    PAYLOAD_BYTES,
    Deliver,
    Forward,
    Hop,
    PacketReader,
    ReplayCache,
    Surb,
    SurbKeys,
    SurbReply,
    create_packet,
    create_surb,
    surb_reply,
    unwrap,
)

__all__ = [
    "HEADER_BYTES",
    "MAX_DELAY_MS",
    "MAX_EPOCH",
    "MAX_HOPS",
    "MAX_MESSAGE",
    "PACKET_BYTES",
    "PAYLOAD_BYTES",
    "Deliver",
    "Forward",
    "Hop",
    "PacketReader",
    "ReplayCache",
    "Surb",
    "SurbKeys",
    "SurbReply",
    "create_packet",
    "create_surb",
    "surb_reply",
    "unwrap",
]
