"""The BitChat binary packet (v1 and v2), as iOS and Android BitChat put it on BLE; sans-I/O.

Layout (all integers big-endian; ``BinaryProtocol.swift`` / ``BinaryProtocol.kt``)::

    v1 header 14 B: version=1 | type | ttl | timestamp u64 (ms) | flags | payloadLen u16
    v2 header 16 B: version=2 | type | ttl | timestamp u64 (ms) | flags | payloadLen u32
    senderID(8) | [recipientID(8) if HAS_RECIPIENT] | [routeCount u8 + routeCount x 8 if HAS_ROUTE, v2 only]
    | [originalSize (u16 v1 / u32 v2) if IS_COMPRESSED] payload | [Ed25519 signature(64) if HAS_SIGNATURE]

- ``payloadLen`` counts the payload plus the original-size prefix when
  compressed, never the route.
- **Compression** is raw DEFLATE (Apple's ``COMPRESSION_ZLIB``; Android's
  ``Deflater(nowrap=true)``); a zlib-wrapped stream is accepted on receive, as
  Android does. The sender compresses when the payload is >= 100 bytes, less than
  90 % of its bytes are distinct and the result is smaller (here: with its size
prefix, so a compressed payload never grows a frame). DEFLATE is not
  canonical, so a decoded packet keeps its wire bytes (``deflated``) and
  re-encodes them as they came: a relay (TTL - 1) and a signature check see the
  originator's bytes.
- **Padding** is PKCS#7-style to the smallest of 256/512/1024/2048 that holds
  the frame + 16, skipped when that needs more than 255 bytes. On BLE only the
  Noise types are padded (:data:`PADDED_TYPES`); the signature preimage is
  always the padded encoding.
- **Signature**: Ed25519 over the padded encoding of the packet with TTL 0, no
  signature and no RSR flag, so relays can decrement the TTL.

Decoding is strict so that every packet has one encoding: the input must be
exactly one frame, or one frame plus valid padding. Unknown flag bits, a route
flag in v1, an empty route, lying lengths, a bad DEFLATE stream, an original
size that does not match or a decompression ratio over 50 000:1 are
:class:`RemoteProtocolError`; building an invalid :class:`Packet` is a
:class:`LocalProtocolError` naming the value. Unknown *type* codes decode (a
relay forwards what it does not understand).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import struct
import zlib
from dataclasses import dataclass, field

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "BLOCK_SIZES",
    "BROADCAST",
    "DEFAULT_TTL",
    "ID_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MAX_RATIO",
    "PADDED_TYPES",
    "SIGNATURE_BYTES",
    "Flags",
    "MessageType",
    "Packet",
    "decode",
    "encode",
    "frame",
    "pad",
    "peer_id",
    "sign",
    "signing_bytes",
    "unpad",
    "verify",
]


class MessageType(enum.IntEnum):
    """The packet type codes BitChat defines (``MessageType.swift``), plus villagemesh's own."""

    ANNOUNCE = 0x01
    MESSAGE = 0x02
    LEAVE = 0x03
    COURIER_ENVELOPE = 0x04
    NOISE_HANDSHAKE = 0x10
    NOISE_ENCRYPTED = 0x11
    FRAGMENT = 0x20
    REQUEST_SYNC = 0x21
    FILE_TRANSFER = 0x22
    BOARD_POST = 0x23
    PREKEY_BUNDLE = 0x24
    GROUP_MESSAGE = 0x25
    PING = 0x26
    PONG = 0x27
    NOSTR_CARRIER = 0x28
    VOICE_FRAME = 0x29
    ANNOUNCE_V2 = 0x2C
    VILLAGEMESH = 0x56
    """A signed villagemesh envelope (see :mod:`.carriage`); 0x56 is 'V', unused by BitChat."""
    VILLAGEMESH_ANNOUNCE = 0x57
    """A villagemesh signed discovery announce (its JSON, :func:`villagemesh.protocols.discovery.encode_discovery`)."""


class Flags(enum.IntFlag):
    """The header's flag bits."""

    HAS_RECIPIENT = 0x01
    HAS_SIGNATURE = 0x02
    IS_COMPRESSED = 0x04
    HAS_ROUTE = 0x08
    IS_RSR = 0x10


_KNOWN_FLAGS = 0x1F
ID_BYTES = 8
"""Peer ids are 8 bytes: the first 8 of SHA-256(Noise static public key)."""
SIGNATURE_BYTES = 64
"""An Ed25519 signature."""
BROADCAST = b"\xff" * ID_BYTES
"""Android's explicit broadcast recipient (iOS omits the recipient instead; both mean everyone)."""
DEFAULT_TTL = 7
"""BitChat's ``messageTTLDefault``."""
MAX_PAYLOAD_BYTES = 10 * 1024 * 1024
"""Android's receiver limit (``MAX_PAYLOAD_LENGTH``) on a payload, expanded or not."""
MAX_RATIO = 50_000
"""A DEFLATE stream may expand at most 50 000:1 (BitChat's compression-bomb guard)."""
BLOCK_SIZES = (256, 512, 1024, 2048)
"""BitChat's padding block sizes."""
PADDED_TYPES = frozenset({MessageType.NOISE_HANDSHAKE, MessageType.NOISE_ENCRYPTED})
"""The types BitChat pads on BLE (``BLEPacketPaddingPolicy``)."""

_COMPRESS_MIN = 100
_HEAD = struct.Struct(">BBBQB")
_LEN = {1: struct.Struct(">H"), 2: struct.Struct(">I")}


@dataclass(frozen=True)
class Packet:
    """One BitChat packet.

    ``wire`` is what a decoded packet's payload arrived as (not part of
    equality): the payload and its DEFLATE bytes, or None if it came
    uncompressed. :func:`encode` sends the payload the same way again instead of
    deciding afresh, unless ``payload`` was replaced.
    """

    type: int
    sender_id: bytes
    timestamp: int
    payload: bytes
    ttl: int = DEFAULT_TTL
    version: int = 1
    recipient_id: bytes | None = None
    route: tuple[bytes, ...] = ()
    signature: bytes | None = None
    rsr: bool = False
    wire: tuple[bytes, bytes | None] | None = field(default=None, compare=False, repr=False)
    """(payload, its DEFLATE bytes or None) as received."""

    def __post_init__(self) -> None:
        for name, value, top in (
            ("type", self.type, 0xFF),
            ("ttl", self.ttl, 0xFF),
            ("timestamp", self.timestamp, 2**64 - 1),
        ):
            if not isinstance(value, int) or not 0 <= value <= top:
                raise LocalProtocolError(f"packet {name} must be an int in 0..{top}, got {value!r}")
        if self.version not in _LEN:
            raise LocalProtocolError(f"packet version must be 1 or 2, got {self.version!r}")
        for name, ident in (
            ("sender_id", self.sender_id),
            ("recipient_id", self.recipient_id),
            *(("route hop", hop) for hop in self.route),
        ):
            if ident is not None and (not isinstance(ident, bytes) or len(ident) != ID_BYTES):
                raise LocalProtocolError(f"{name} must be {ID_BYTES} bytes, got {ident!r}")
        if self.route and self.version == 1:
            raise LocalProtocolError(f"a source route needs version 2, not {self.version}")
        if len(self.route) > 0xFF:
            raise LocalProtocolError(f"a route has at most 255 hops, got {len(self.route)}")
        if self.signature is not None and (
            not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES
        ):
            raise LocalProtocolError(f"signature must be {SIGNATURE_BYTES} bytes, got {self.signature!r}")
        if not isinstance(self.payload, bytes) or len(self.payload) > MAX_PAYLOAD_BYTES:
            raise LocalProtocolError(
                f"payload must be bytes of at most {MAX_PAYLOAD_BYTES}, got {len(self.payload)!r} bytes"
            )

    @property
    def is_broadcast(self) -> bool:
        """No recipient, or Android's all-0xFF one."""
        return self.recipient_id is None or self.recipient_id == BROADCAST


def peer_id(noise_static_public: bytes) -> bytes:
    """BitChat's peer id: the first 8 bytes of SHA-256 of the Noise static public key (``PeerID.swift``)."""
    return hashlib.sha256(noise_static_public).digest()[:ID_BYTES]


# ---------------------------------------------------------------------------- padding


def pad(data: bytes) -> bytes:
    """PKCS#7-style padding to the smallest block holding ``len(data) + 16``; unchanged if over 255 bytes are needed."""
    target = next((size for size in BLOCK_SIZES if len(data) + 16 <= size), len(data))
    need = target - len(data)
    if not 0 < need <= 0xFF:
        return data
    return data + bytes([need]) * need


def unpad(data: bytes) -> bytes | None:
    """The data without valid PKCS#7 padding, or None if it ends in none."""
    if not data:
        return None
    need = data[-1]
    if need == 0 or need > len(data) or data[-need:] != bytes([need]) * need:
        return None
    return data[:-need]


# ---------------------------------------------------------------------------- compression


def _should_compress(payload: bytes) -> bool:
    if len(payload) < _COMPRESS_MIN:
        return False
    return len(set(payload)) / min(len(payload), 256) < 0.9


def _deflate(payload: bytes) -> bytes | None:
    compressor = zlib.compressobj(wbits=-15)
    out = compressor.compress(payload) + compressor.flush()
    return out if len(out) + 4 < len(payload) else None  # smaller even with a v2 size prefix


def _inflate(data: bytes, size: int) -> bytes:
    # A zlib header is CMF 0x78 plus a check byte making the pair a multiple of 31; anything else is raw.
    wrapped = len(data) >= 2 and data[0] == 0x78 and (data[0] << 8 | data[1]) % 31 == 0
    inflater = zlib.decompressobj(wbits=15 if wrapped else -15)
    try:
        out = inflater.decompress(data, size)
    except zlib.error as exc:
        raise RemoteProtocolError(f"compressed payload of {len(data)} bytes is not DEFLATE: {exc}") from exc
    if len(out) != size or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise RemoteProtocolError(
            f"compressed payload of {len(data)} bytes does not expand to exactly its declared {size}"
        )
    return out


# ---------------------------------------------------------------------------- encode


def encode(packet: Packet, *, padding: bool = False) -> bytes:
    """The packet's bytes, padded if asked.

    Raises:
        LocalProtocolError: a v1 packet whose payload does not fit a 2-byte length.
    """
    body = packet.payload
    deflated: bytes | None = None
    if packet.wire is not None and packet.wire[0] == body:
        deflated = packet.wire[1]
    elif _should_compress(body):
        deflated = _deflate(body)
    length = _LEN[packet.version]
    flags = 0
    if packet.recipient_id is not None:
        flags |= Flags.HAS_RECIPIENT
    if packet.signature is not None:
        flags |= Flags.HAS_SIGNATURE
    if packet.route:
        flags |= Flags.HAS_ROUTE
    if packet.rsr:
        flags |= Flags.IS_RSR
    if deflated is not None:
        flags |= Flags.IS_COMPRESSED
        body = length.pack(len(packet.payload)) + deflated
    top = 2 ** (8 * length.size) - 1
    if len(body) > top or len(packet.payload) > top:
        raise LocalProtocolError(
            f"a v{packet.version} packet carries at most {top} payload bytes, got {len(packet.payload)}"
        )
    parts = [
        _HEAD.pack(packet.version, packet.type, packet.ttl, packet.timestamp, flags),
        length.pack(len(body)),
        packet.sender_id,
    ]
    if packet.recipient_id is not None:
        parts.append(packet.recipient_id)
    if packet.route:
        parts.append(bytes([len(packet.route)]))
        parts.extend(packet.route)
    parts.append(body)
    if packet.signature is not None:
        parts.append(packet.signature)
    out = b"".join(parts)
    return pad(out) if padding else out


def frame(packet: Packet) -> bytes:
    """The packet as BitChat puts it on BLE: padded if it is a Noise type, as it stands otherwise."""
    return encode(packet, padding=packet.type in PADDED_TYPES)


# ---------------------------------------------------------------------------- decode


def decode(data: bytes) -> Packet:
    """One packet from exactly one frame, padded or not.

    Raises:
        RemoteProtocolError: the bytes are not exactly one valid packet, as
            they came or without their padding (the message names both reasons).
    """
    try:
        return _decode_exact(data)
    except RemoteProtocolError as exc:
        unpadded = unpad(data)
        if unpadded is None:
            raise
        first = exc
    try:
        return _decode_exact(unpadded)
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(f"{first}; and without its padding: {exc}") from exc


def _decode_exact(data: bytes) -> Packet:
    if len(data) < 1 or data[0] not in _LEN:
        raise RemoteProtocolError(f"unsupported BitChat version {data[:1].hex() or 'none'} (only 1 and 2)")
    length = _LEN[data[0]]
    fixed = _HEAD.size + length.size + ID_BYTES
    if len(data) < fixed:
        raise RemoteProtocolError(f"packet of {len(data)} bytes is shorter than its {fixed}-byte header")
    version, kind, ttl, timestamp, flags = _HEAD.unpack_from(data)
    (body_len,) = length.unpack_from(data, _HEAD.size)
    if flags & ~_KNOWN_FLAGS:
        raise RemoteProtocolError(f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:02x} in flags 0x{flags:02x}")
    if flags & Flags.HAS_ROUTE and version == 1:
        raise RemoteProtocolError("route flag set in a v1 packet (routes need v2)")
    pos = _HEAD.size + length.size
    sender = data[pos : pos + ID_BYTES]
    pos += ID_BYTES
    recipient = None
    if flags & Flags.HAS_RECIPIENT:
        recipient = _take(data, pos, ID_BYTES, "recipient id")
        pos += ID_BYTES
    route: tuple[bytes, ...] = ()
    if flags & Flags.HAS_ROUTE:
        count = _take(data, pos, 1, "route count")[0]
        if count == 0:
            raise RemoteProtocolError("route flag set with an empty route")
        hops = _take(data, pos + 1, count * ID_BYTES, f"route of {count} hops")
        route = tuple(hops[i : i + ID_BYTES] for i in range(0, len(hops), ID_BYTES))
        pos += 1 + count * ID_BYTES
    signature_len = SIGNATURE_BYTES if flags & Flags.HAS_SIGNATURE else 0
    expected = pos + body_len + signature_len
    if len(data) != expected:
        raise RemoteProtocolError(f"packet is {len(data)} bytes but its lengths say {expected} (payloadLen {body_len})")
    body = data[pos : pos + body_len]
    signature = data[pos + body_len :] if signature_len else None
    deflated = None
    if flags & Flags.IS_COMPRESSED:
        payload, deflated = _expand(body, length)
    else:
        payload = body
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise RemoteProtocolError(f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit")
    return Packet(
        type=kind,
        sender_id=sender,
        timestamp=timestamp,
        payload=payload,
        ttl=ttl,
        version=version,
        recipient_id=recipient,
        route=route,
        signature=signature,
        rsr=bool(flags & Flags.IS_RSR),
        wire=(payload, deflated),
    )


def _take(data: bytes, pos: int, size: int, what: str) -> bytes:
    if len(data) < pos + size:
        raise RemoteProtocolError(f"packet of {len(data)} bytes is truncated in its {what}")
    return data[pos : pos + size]


def _expand(body: bytes, length: struct.Struct) -> tuple[bytes, bytes]:
    if len(body) <= length.size:
        raise RemoteProtocolError(f"compressed payload of {len(body)} bytes has no DEFLATE bytes after its size")
    (size,) = length.unpack_from(body)
    deflated = body[length.size :]
    if not 0 < size <= MAX_PAYLOAD_BYTES or size > MAX_RATIO * len(deflated):
        raise RemoteProtocolError(f"declared expanded size {size} of {len(deflated)} DEFLATE bytes is out of range")
    return _inflate(deflated, size), deflated


# ---------------------------------------------------------------------------- signatures


def signing_bytes(packet: Packet) -> bytes:
    """What the sender signs: the padded encoding with TTL 0, no signature and no RSR flag."""
    return encode(dataclasses.replace(packet, ttl=0, signature=None, rsr=False), padding=True)


def sign(packet: Packet, key: SigningKey) -> Packet:
    """The packet signed by ``key`` (the HAS_SIGNATURE flag and 64 bytes added)."""
    return dataclasses.replace(packet, signature=key.sign(signing_bytes(packet)).signature)


def verify(packet: Packet, public_key: bytes) -> None:
    """Check the packet's signature against an Ed25519 public key.

    Raises:
        RemoteProtocolError: the packet is unsigned, the key is not 32 bytes,
            or the signature does not verify.
    """
    if packet.signature is None:
        raise RemoteProtocolError(f"packet type 0x{packet.type:02x} from {packet.sender_id.hex()} is unsigned")
    if len(public_key) != 32:
        raise RemoteProtocolError(f"Ed25519 public key must be 32 bytes, got {public_key.hex()}")
    try:
        VerifyKey(public_key).verify(signing_bytes(packet), packet.signature)
    except (BadSignatureError, ValueError) as exc:  # nacl: a bad signature, or a point that is not on the curve
        raise RemoteProtocolError(
            f"signature of packet type 0x{packet.type:02x} from {packet.sender_id.hex()} does not verify"
        ) from exc
