"""The transfer actor's pure decisions: where a received file goes, when a sender asks again, what rate is.

The protocol itself (offers, windows, acks, verification) is the sans-I/O
:mod:`villagemesh.protocols.transfer`; this module holds what the actor adds
around it, each a function of its inputs (no clock, no file system).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from villagemesh.errors import LocalProtocolError
from villagemesh.protocols.transfer import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, DigestAlgorithm, whole_digest

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_STALL_S",
    "DEFAULT_WINDOW",
    "TRANSPORT_CHUNK_BYTES",
    "Stall",
    "WholeDigest",
    "chunk_size_for",
    "digest_for_cpu",
    "received_name",
]

DEFAULT_WINDOW = 16
"""Chunks in flight per transfer: 16 x 256 KiB = 4 MiB unacknowledged at most. Peak RSS growth moving a
file was ~23 MiB per side at 16 (8: ~16 MiB, 32: ~30 MiB) once chunk envelopes were no longer kept in the
envelope cache; before that a chunk in flight cost ~2.5 MiB per side and 16 peaked at 82 MiB. 16 moved
~100 MiB/s where 8 moved ~80 (docs/benchmarks.md)."""

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


def digest_for_cpu(machine: str, cpuinfo: str) -> DigestAlgorithm:
    """The whole digest a sender on this CPU chooses (``machine``: ``platform.machine()``; ``cpuinfo``:
    the text of ``/proc/cpuinfo``, "" where there is none): SHA-256 where the CPU has SHA-256
    instructions (x86 ``sha_ni``, Arm ``sha2``), where it runs about twice as fast as BLAKE2b (1,716
    against 884 MiB/s here); BLAKE2b-256 elsewhere (a Raspberry Pi 4 has no SHA instructions, and
    SHA-256 in software is the slower of the two)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    wanted = "sha_ni" if machine.lower() in ("x86_64", "amd64", "i686", "i386") else "sha2"
    return DigestAlgorithm.SHA_256 if wanted in flags else DigestAlgorithm.BLAKE2B_256


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


class WholeDigest:
    """The whole-file digest of an incoming transfer, fed chunk after chunk in order as the committed prefix
    grows, so that verifying once every chunk is in hashes nothing again (hashing the whole file after the
    last chunk was a serial tail of ~20 % of a transfer's time). Not stored: a restarted receiver starts
    again from chunk 0, reading the committed chunks back from the partial file."""

    def __init__(self, algorithm: DigestAlgorithm = DigestAlgorithm.BLAKE2B_256) -> None:
        self._hash = whole_digest(algorithm)
        self.next = 0
        """The next chunk to feed: chunks ``0 .. next-1`` are in the digest."""

    def due(self, prefix: int) -> range:
        """The chunks to feed, in order, now that chunks ``0 .. prefix-1`` are committed."""
        return range(self.next, max(self.next, prefix))

    def feed(self, index: int, data: bytes) -> None:
        """Chunk ``index``'s bytes (it must be :attr:`next`: a digest takes its bytes in order)."""
        if index != self.next:
            raise LocalProtocolError(f"chunk {index} fed to the whole digest, which needs chunk {self.next}")
        self._hash.update(data)
        self.next += 1

    def digest(self) -> bytes:
        """The digest of every chunk fed so far."""
        return self._hash.digest()
