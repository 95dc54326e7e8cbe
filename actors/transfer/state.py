"""The transfer actor's pure decisions: where a received file goes, when a sender asks again, what rate is.

The protocol itself (offers, windows, acks, verification) is the sans-I/O
:mod:`villagemesh.protocols.transfer`; this module holds what the actor adds
around it, each a function of its inputs (no clock, no file system).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from villagemesh.protocols.transfer import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_STALL_S",
    "DEFAULT_WINDOW",
    "TRANSPORT_CHUNK_BYTES",
    "Stall",
    "chunk_size_for",
    "received_name",
]

DEFAULT_WINDOW = 8
"""Chunks in flight per transfer: 8 x 256 KiB = 2 MiB unacknowledged at most. Each chunk in flight costs
about 2.5 MiB of peak RSS per side (its copies along the hops, and what malloc keeps of them): a window
of 16 peaked at 82 MiB while moving 1 GiB, 8 at 63 MiB, at the same throughput (docs/benchmarks.md)."""

TRANSPORT_CHUNK_BYTES: dict[str, int] = {"websocket": 256 * 1024, "libp2p": 256 * 1024, "bitchat": 1024}
"""The chunk each transport carries well: WebSocket frames of 256 KiB keep a small message's wait behind
one chunk under a few ms at loopback speed; a BLE link takes about 1 KiB. (BetaNet's 1,437-byte packets
carry no chunk, so BetaNet is not one of them: in the anonymous mode a chunk fails over to the next
transport, as an envelope too large for a packet does.)"""

DEFAULT_CHUNK_BYTES = TRANSPORT_CHUNK_BYTES["websocket"]

DEFAULT_STALL_S = 10.0
"""Seconds without an ack before a sender offers again (the answer is the receiver's resume point)."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]")


def chunk_size_for(transports: tuple[str, ...]) -> int:
    """The chunk size of a transfer over ``transports`` (those this node runs that carry chunks): the
    smallest any of them carries, so that failover to the next one never meets a chunk too large for it."""
    sizes = [TRANSPORT_CHUNK_BYTES[t] for t in transports if t in TRANSPORT_CHUNK_BYTES]
    size = min(sizes) if sizes else DEFAULT_CHUNK_BYTES
    return max(MIN_CHUNK_BYTES, min(MAX_CHUNK_BYTES, size))


def received_name(name: str, transfer_id: bytes, taken: Callable[[str], bool]) -> str:
    """The file name a received ``name`` gets: its last path part, made safe, not one already ``taken``."""
    base = _UNSAFE.sub("_", name.replace("\\", "/").rsplit("/", 1)[-1]).strip(" .") or transfer_id.hex()
    if not taken(base):
        return base
    stem, dot, ext = base.rpartition(".")
    stem, ext = (stem, f".{ext}") if dot and stem else (base, "")
    return f"{stem}-{transfer_id.hex()[:8]}{ext}"


@dataclass
class Stall:
    """Whether a sender has made progress since the last tick; two ticks without one: offer again."""

    last: int = -1
    quiet: int = 0

    def tick(self, acked: int) -> bool:
        """The sender's ``acked`` now; True when it should offer again."""
        if acked != self.last:
            self.last, self.quiet = acked, 0
            return False
        self.quiet += 1
        return self.quiet >= 1
