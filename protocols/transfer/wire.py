"""The wire messages of a large transfer, and their compact binary codec.

Each message is the payload of one envelope (kind :data:`TRANSFER_KIND`), so it
travels as an ordinary reliable message: stored, acknowledged, retried and
failed over like any other. Layout (big-endian, ``struct``)::

    offset size  field
    0      1     version         WIRE_VERSION (2)
    1      1     type            1 OFFER .. 7 FAILED
    2      16    transfer id     random, the sender's
    then, by type:
    OFFER      size u64 ‖ chunk_size u32 ‖ algorithm u8 ‖ digest 32 (of the whole) ‖ kind 1+K ‖ name 2+N
    ACCEPT     resume_from u32   chunks the receiver has committed, in order from 0 (where to go on)
    REFUSE     reason u8 ‖ detail 2+N
    CHUNK      index u32 ‖ check u32 (CRC-32 of data) ‖ data (the rest, 1 .. MAX_CHUNK_BYTES)
    CHUNK_ACK  committed u32     chunks committed in order from 0 (the resume point, and the window's base)
    COMPLETE   digest 32         the receiver verified the whole and moved it into place
    FAILED     reason u8 ‖ detail 2+N

Two checks, each for its own purpose:

- the **whole digest** (:class:`DigestAlgorithm`: BLAKE2b-256 or SHA-256, named in
  the offer) is the real check: announced up front, the receiver hashes what it
  committed and moves the file into place only if the two are equal. The sender
  chooses; SHA-256 is what ``sha256sum`` prints and what model hubs publish, and
  the faster of the two on a CPU with SHA instructions, BLAKE2b the faster
  without them.
- the **chunk check** (CRC-32) catches a torn or corrupted chunk before it is
  committed, so a resumed transfer never builds on a bad chunk. It guards
  against accidents, not an adversary: the link is authenticated encryption, and
  a chunk's check is computed by the sender over what it sends, so no chunk
  check could stop a sender sending other bytes; the whole digest does. (Version
  1 carried a BLAKE2b-128 per chunk: four strong hash passes per transfer where
  two do the same work, see docs/benchmarks.md.)

Limits (each with its reason):

- :data:`MAX_CHUNK_BYTES` = 1 MiB - 1 KiB: a chunk and its headers fit an
  envelope's 1 MiB payload.
- :data:`MAX_TRANSFER_BYTES` = 2**40 (1 TiB): far beyond any model or data set a
  village node holds; with the smallest chunk the chunk count still fits u32.
- :data:`MAX_TEXT_BYTES` = 1,024 for a name or detail: a file name, a reason.
- the chunk count (size / chunk_size rounded up) fits 32 bits.

Decoding is strict: wrong version, unknown type, short or trailing bytes,
non-UTF-8 text or out-of-range numbers are :class:`RemoteProtocolError`; making
an invalid message is :class:`LocalProtocolError`.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "CHUNK_KIND",
    "DIGEST_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_TEXT_BYTES",
    "MAX_TRANSFER_BYTES",
    "MIN_CHUNK_BYTES",
    "TRANSFER_ID_BYTES",
    "TRANSFER_KIND",
    "WIRE_VERSION",
    "Accept",
    "Chunk",
    "ChunkAck",
    "Complete",
    "DigestAlgorithm",
    "FailReason",
    "Failed",
    "Offer",
    "Refuse",
    "RefuseReason",
    "WireMessage",
    "chunk_check",
    "chunk_count",
    "decode",
    "encode",
    "whole_digest",
]

WIRE_VERSION = 2
TRANSFER_KIND = "villagemesh.transfer"
"""The envelope kind of offers and answers but chunk acks (reserved: applications cannot send it)."""
CHUNK_KIND = "villagemesh.transfer.chunk"
"""The envelope kind of a :class:`Chunk` and a :class:`ChunkAck`: a retrier keeps these in memory only
(never in its outbox or inbox: their reliability is the transfer's own, a sender re-reads a chunk from
its file when an answer rewinds it, and each chunk ack repeats the committed prefix), and acknowledges
one only once the transfer actor committed it."""
TRANSFER_ID_BYTES = 16
"""Transfer ids are 128 random bits, like message ids."""
DIGEST_BYTES = 32
"""The whole digest: 256 bits, whichever :class:`DigestAlgorithm`."""
MAX_CHUNK_BYTES = 1024 * 1024 - 1024
"""A chunk with its transfer header and the envelope's header fits the 1 MiB payload."""
MIN_CHUNK_BYTES = 256
"""Below this, headers outweigh data (the smallest transport, BetaNet, takes about 1 KiB)."""
MAX_TRANSFER_BYTES = 1 << 40
"""1 TiB: beyond any model or data set here; chunk counts stay in 32 bits at MIN_CHUNK_BYTES * 2**32."""
MAX_TEXT_BYTES = 1024
"""A name or a detail: one line of text."""

_HEAD = struct.Struct(">BB16s")
_OFFER = struct.Struct(">QIB32s")
_U32 = struct.Struct(">I")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_CHUNK = struct.Struct(">II")


class DigestAlgorithm(enum.IntEnum):
    """The hash of a transfer's whole digest, as the offer names it."""

    BLAKE2B_256 = 1
    SHA_256 = 2

    @property
    def label(self) -> str:
        """The name people know it by (``b2sum -l 256``, ``sha256sum``)."""
        return _LABELS[self]

    @classmethod
    def of(cls, label: str) -> DigestAlgorithm:
        """The algorithm named ``label`` ("blake2b-256" or "sha256"); LocalProtocolError for another."""
        for algorithm, known in _LABELS.items():
            if label == known:
                return algorithm
        raise LocalProtocolError(f"digest algorithm must be one of {sorted(_LABELS.values())}, got {label!r}")


_LABELS = {DigestAlgorithm.BLAKE2B_256: "blake2b-256", DigestAlgorithm.SHA_256: "sha256"}


class RefuseReason(enum.IntEnum):
    """Why a receiver refused an offer (before any byte was written)."""

    TOO_LARGE = 1
    KIND_NOT_ALLOWED = 2
    NO_SPACE = 3
    INVALID = 4


class FailReason(enum.IntEnum):
    """Why a transfer ended without a verified file."""

    DIGEST_MISMATCH = 1
    UNKNOWN_TRANSFER = 2
    CANCELLED = 3
    STORAGE = 4


def chunk_count(size: int, chunk_size: int) -> int:
    """Chunks of ``chunk_size`` that hold ``size`` bytes (an empty transfer has none)."""
    return -(-size // chunk_size)


def chunk_check(data: bytes | memoryview) -> int:
    """The per-chunk check: CRC-32 (zlib's; it lets go of the interpreter lock on a chunk)."""
    return zlib.crc32(data)


def whole_digest(algorithm: DigestAlgorithm = DigestAlgorithm.BLAKE2B_256) -> Any:
    """A fresh hash of the whole by ``algorithm`` (feed it every chunk in order; ``.digest()`` is 32 bytes)."""
    if algorithm is DigestAlgorithm.SHA_256:
        return hashlib.sha256()
    return hashlib.blake2b(digest_size=DIGEST_BYTES)


def _check_bytes(name: str, value: object, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise LocalProtocolError(f"{name} must be {size} bytes, got {value!r:.80}")


def _check_id(transfer_id: object) -> None:
    _check_bytes("transfer id", transfer_id, TRANSFER_ID_BYTES)


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or len(value.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES:
        raise LocalProtocolError(f"{name} must be a str of at most {MAX_TEXT_BYTES} UTF-8 bytes, got {value!r:.80}")


def _check_u32(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 32:
        raise LocalProtocolError(f"{name} must be an int in 0..2**32-1, got {value!r}")


@dataclass(frozen=True)
class Offer:
    """The sender offers ``size`` bytes of ``kind`` named ``name`` in ``chunk_size`` chunks, hashing to
    ``digest`` by ``algorithm``."""

    transfer_id: bytes
    size: int
    chunk_size: int
    digest: bytes
    kind: str
    name: str
    algorithm: DigestAlgorithm = DigestAlgorithm.BLAKE2B_256

    def __post_init__(self) -> None:
        _check_id(self.transfer_id)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 0 <= self.size <= MAX_TRANSFER_BYTES:
            raise LocalProtocolError(f"size must be an int in 0..{MAX_TRANSFER_BYTES}, got {self.size!r}")
        chunk = self.chunk_size
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES:
            raise LocalProtocolError(f"chunk_size must be in {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}, got {chunk!r}")
        _check_bytes("digest", self.digest, DIGEST_BYTES)
        if isinstance(self.algorithm, bool) or self.algorithm not in _LABELS:
            raise LocalProtocolError(f"algorithm must be a DigestAlgorithm, got {self.algorithm!r}")
        object.__setattr__(self, "algorithm", DigestAlgorithm(self.algorithm))
        _check_text("kind", self.kind)
        if not self.kind or len(self.kind.encode("utf-8", "surrogatepass")) > 255:
            raise LocalProtocolError(f"kind must be 1..255 UTF-8 bytes, got {self.kind!r}")
        _check_text("name", self.name)

    @property
    def chunks(self) -> int:
        """How many chunks the transfer has."""
        return chunk_count(self.size, self.chunk_size)

    def chunk_length(self, index: int) -> int:
        """The length chunk ``index`` must have (the last one may be shorter)."""
        return min(self.chunk_size, self.size - index * self.chunk_size)


@dataclass(frozen=True)
class Accept:
    """The receiver takes the offer; send from chunk ``resume_from`` on (it has every chunk before)."""

    transfer_id: bytes
    resume_from: int

    def __post_init__(self) -> None:
        _check_id(self.transfer_id)
        _check_u32("resume_from", self.resume_from)


@dataclass(frozen=True)
class Refuse:
    """The receiver will not take the offer (nothing was written)."""

    transfer_id: bytes
    reason: RefuseReason
    detail: str

    def __post_init__(self) -> None:
        _check_id(self.transfer_id)
        object.__setattr__(self, "reason", RefuseReason(self.reason))
        _check_text("detail", self.detail)


@dataclass(frozen=True)
class Chunk:
    """Chunk ``index`` of the transfer, ``data`` with its ``check`` (:func:`chunk_check`)."""

    transfer_id: bytes
    index: int
    check: int
    data: bytes

    def __post_init__(self) -> None:
        _check_id(self.transfer_id)
        _check_u32("index", self.index)
        _check_u32("chunk check", self.check)
        if not isinstance(self.data, bytes) or not 0 < len(self.data) <= MAX_CHUNK_BYTES:
            raise LocalProtocolError(f"chunk data must be 1..{MAX_CHUNK_BYTES} bytes, got {type(self.data).__name__}")

    @classmethod
    def of(cls, transfer_id: bytes, index: int, data: bytes) -> Chunk:
        """A chunk with its check computed."""
        return cls(transfer_id, index, chunk_check(data), data)

    @property
    def intact(self) -> bool:
        """Whether ``data`` matches its ``check``."""
        return chunk_check(self.data) == self.check


@dataclass(frozen=True)
class ChunkAck:
    """The receiver has committed every chunk before ``committed`` (durably)."""

    transfer_id: bytes
    committed: int

    def __post_init__(self) -> None:
        _check_id(self.transfer_id)
        _check_u32("committed", self.committed)


@dataclass(frozen=True)
class Complete:
    """The receiver verified the whole (``digest``) and moved it into place."""

    transfer_id: bytes
    digest: bytes

    def __post_init__(self) -> None:
        _check_id(self.transfer_id)
        _check_bytes("digest", self.digest, DIGEST_BYTES)


@dataclass(frozen=True)
class Failed:
    """The transfer ended without a verified file (``reason``, ``detail``): either side may say so."""

    transfer_id: bytes
    reason: FailReason
    detail: str

    def __post_init__(self) -> None:
        _check_id(self.transfer_id)
        object.__setattr__(self, "reason", FailReason(self.reason))
        _check_text("detail", self.detail)


WireMessage = Offer | Accept | Refuse | Chunk | ChunkAck | Complete | Failed
"""Every transfer message."""

_TYPES: dict[type, int] = {Offer: 1, Accept: 2, Refuse: 3, Chunk: 4, ChunkAck: 5, Complete: 6, Failed: 7}
_CLASSES: dict[int, type] = {number: cls for cls, number in _TYPES.items()}


def _text(value: str, width: struct.Struct) -> bytes:
    raw = value.encode("utf-8", "surrogatepass")
    return width.pack(len(raw)) + raw


def encode(message: WireMessage) -> bytes:
    """The bytes of ``message``."""
    head = _HEAD.pack(WIRE_VERSION, _TYPES[type(message)], message.transfer_id)
    if isinstance(message, Offer):
        body = _OFFER.pack(message.size, message.chunk_size, int(message.algorithm), message.digest)
        return head + body + _text(message.kind, _U8) + _text(message.name, _U16)
    if isinstance(message, Accept):
        return head + _U32.pack(message.resume_from)
    if isinstance(message, ChunkAck):
        return head + _U32.pack(message.committed)
    if isinstance(message, Chunk):
        return b"".join((head, _CHUNK.pack(message.index, message.check), message.data))
    if isinstance(message, Complete):
        return head + message.digest
    return head + _U8.pack(int(message.reason)) + _text(message.detail, _U16)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise RemoteProtocolError(f"transfer message truncated: need {n} bytes at offset {self.at}")
        out = bytes(self.data[self.at : self.at + n])
        self.at += n
        return out

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        """The fields of ``fmt`` (typed as ``struct`` types them: each caller's format says what they are)."""
        return fmt.unpack(self.take(fmt.size))

    def text(self, width: struct.Struct) -> str:
        (n,) = self.unpack(width)
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(f"transfer message text is not UTF-8: {exc}") from None

    def rest(self) -> bytes:
        out = bytes(self.data[self.at :])
        self.at = len(self.data)
        return out

    def end(self) -> None:
        if self.at != len(self.data):
            raise RemoteProtocolError(f"{len(self.data) - self.at} trailing byte(s) after a transfer message")


def decode(data: bytes) -> WireMessage:
    """The message ``data`` encodes; :class:`RemoteProtocolError` for anything else."""
    reader = _Reader(data)
    version, kind, transfer_id = reader.unpack(_HEAD)
    if version != WIRE_VERSION:
        raise RemoteProtocolError(f"transfer wire version {version} is not {WIRE_VERSION}")
    try:
        message = _decode_body(int(kind), transfer_id, reader)
    except (LocalProtocolError, ValueError) as exc:  # a field out of range, an unknown reason number
        raise RemoteProtocolError(f"invalid transfer message: {exc}") from None
    reader.end()
    return message


def _decode_body(kind: int, transfer_id: bytes, r: _Reader) -> WireMessage:
    cls = _CLASSES.get(kind)
    if cls is None:
        raise RemoteProtocolError(f"unknown transfer message type {kind}")
    if cls is Offer:
        size, chunk_size, algorithm, digest = r.unpack(_OFFER)
        return Offer(transfer_id, size, chunk_size, digest, r.text(_U8), r.text(_U16), algorithm)
    if cls is Accept or cls is ChunkAck:
        (number,) = r.unpack(_U32)
        return cls(transfer_id, number)
    if cls is Refuse:
        (reason,) = r.unpack(_U8)
        return Refuse(transfer_id, RefuseReason(reason), r.text(_U16))
    if cls is Chunk:
        index, check = r.unpack(_CHUNK)
        return Chunk(transfer_id, index, check, r.rest())
    if cls is Complete:
        return Complete(transfer_id, r.take(DIGEST_BYTES))
    (reason,) = r.unpack(_U8)
    return Failed(transfer_id, FailReason(reason), r.text(_U16))
