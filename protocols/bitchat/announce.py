"""BitChat's announce payload (packet type 0x01) and the small TLV payloads inside Noise sessions.

Announce TLVs, each ``type u8 | len u8 | value`` (``AnnouncementPacket`` in
``Packets.swift``; ``IdentityAnnouncement.kt``)::

    0x01 nickname            UTF-8, required
    0x02 Noise public key    32 bytes, required
    0x03 Ed25519 public key  32 bytes, required
    0x04 direct neighbours   up to 10 peer ids of 8 bytes
    0x05 capabilities        an opaque little-endian bitfield (kept as bytes)
    0x06 bridge geohash      up to 12 ASCII characters
    other                    kept in ``extensions`` and re-encoded after the known ones

The encoder writes the known TLVs in that order, then the extensions (the order
of the golden vector in bitchat-android's wire-contract test). The decoder
accepts any order but refuses a known TLV twice, a value of the wrong size, a
missing required field and a truncated TLV, as :class:`RemoteProtocolError`.

Inside a Noise session the plaintext is a ``NoisePayload``: one type byte, then
data; a private message's data is TLVs ``0x00 messageID | 0x01 content`` with
one-byte lengths (``PrivateMessagePacket``).
"""

from __future__ import annotations

from dataclasses import dataclass

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

from .packet import ID_BYTES

__all__ = [
    "KEY_BYTES",
    "MAX_GEOHASH",
    "MAX_NEIGHBOURS",
    "Announcement",
    "NoisePayload",
    "PrivateMessage",
    "decode_announcement",
    "decode_noise_payload",
    "decode_private_message",
    "encode_announcement",
    "encode_noise_payload",
    "encode_private_message",
]

KEY_BYTES = 32
"""X25519 and Ed25519 public keys."""
MAX_NEIGHBOURS = 10
"""BitChat announces at most 10 direct neighbours."""
MAX_GEOHASH = 12
"""A geohash of 12 characters is a few centimetres: more precision means nothing."""
_MAX_TLV = 0xFF

_NICKNAME, _NOISE, _SIGNING, _NEIGHBOURS, _CAPABILITIES, _GEOHASH = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
_KNOWN = (_NICKNAME, _NOISE, _SIGNING, _NEIGHBOURS, _CAPABILITIES, _GEOHASH)


def _tlvs(data: bytes, what: str) -> list[tuple[int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise RemoteProtocolError(f"{what} ends in a truncated TLV header at byte {pos}")
        kind, size = data[pos], data[pos + 1]
        if pos + 2 + size > len(data):
            raise RemoteProtocolError(f"{what} TLV 0x{kind:02x} says {size} bytes but {len(data) - pos - 2} remain")
        out.append((kind, data[pos + 2 : pos + 2 + size]))
        pos += 2 + size
    return out


def _tlv(kind: int, value: bytes) -> bytes:
    if len(value) > _MAX_TLV:
        raise LocalProtocolError(f"TLV 0x{kind:02x} value of {len(value)} bytes is over {_MAX_TLV}")
    return bytes([kind, len(value)]) + value


def _utf8(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"{what} {value!r} is not UTF-8") from exc


@dataclass(frozen=True)
class Announcement:
    """Who a peer is: its nickname and keys, and optionally its neighbours, capabilities and geohash."""

    nickname: str
    noise_public_key: bytes
    signing_public_key: bytes
    neighbours: tuple[bytes, ...] | None = None
    capabilities: bytes | None = None
    geohash: str | None = None
    extensions: tuple[tuple[int, bytes], ...] = ()

    def __post_init__(self) -> None:
        for name, key in (("noise_public_key", self.noise_public_key), ("signing_public_key", self.signing_public_key)):
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise LocalProtocolError(f"{name} must be {KEY_BYTES} bytes, got {key!r}")
        if self.neighbours is not None and (
            len(self.neighbours) > MAX_NEIGHBOURS or any(len(n) != ID_BYTES for n in self.neighbours)
        ):
            raise LocalProtocolError(
                f"neighbours must be at most {MAX_NEIGHBOURS} ids of {ID_BYTES} bytes, got {self.neighbours!r}"
            )
        if self.geohash is not None and (len(self.geohash) > MAX_GEOHASH or not self.geohash.isascii()):
            raise LocalProtocolError(f"geohash must be at most {MAX_GEOHASH} ASCII characters, got {self.geohash!r}")
        for kind, _ in self.extensions:
            if kind in _KNOWN or not 0 <= kind <= 0xFF:
                raise LocalProtocolError(f"extension TLV type {kind!r} is a known type or not a byte")


def encode_announcement(announcement: Announcement) -> bytes:
    """The announce payload.

    Raises:
        LocalProtocolError: the nickname, capabilities or an extension is over 255 bytes.
    """
    a = announcement
    parts = [
        _tlv(_NICKNAME, a.nickname.encode()),
        _tlv(_NOISE, a.noise_public_key),
        _tlv(_SIGNING, a.signing_public_key),
    ]
    if a.neighbours is not None:
        parts.append(_tlv(_NEIGHBOURS, b"".join(a.neighbours)))
    if a.capabilities is not None:
        parts.append(_tlv(_CAPABILITIES, a.capabilities))
    if a.geohash is not None:
        parts.append(_tlv(_GEOHASH, a.geohash.encode()))
    parts.extend(_tlv(kind, value) for kind, value in a.extensions)
    return b"".join(parts)


def decode_announcement(data: bytes) -> Announcement:
    """An announce payload.

    Raises:
        RemoteProtocolError: a truncated or repeated TLV, a value of the wrong
            size or encoding, or a missing nickname or key.
    """
    known: dict[int, bytes] = {}
    extensions = []
    for kind, value in _tlvs(data, "announce"):
        if kind not in _KNOWN:
            extensions.append((kind, value))
        elif kind in known:
            raise RemoteProtocolError(f"announce repeats TLV 0x{kind:02x}")
        else:
            known[kind] = value
    for kind in (_NICKNAME, _NOISE, _SIGNING):
        if kind not in known:
            raise RemoteProtocolError(f"announce lacks required TLV 0x{kind:02x}")
    for kind in (_NOISE, _SIGNING):
        if len(known[kind]) != KEY_BYTES:
            raise RemoteProtocolError(f"announce key TLV 0x{kind:02x} is {len(known[kind])} bytes, not {KEY_BYTES}")
    neighbours = None
    if _NEIGHBOURS in known:
        raw = known[_NEIGHBOURS]
        if len(raw) % ID_BYTES or len(raw) > MAX_NEIGHBOURS * ID_BYTES:
            raise RemoteProtocolError(
                f"announce neighbours TLV of {len(raw)} bytes is not up to {MAX_NEIGHBOURS} ids of {ID_BYTES}"
            )
        neighbours = tuple(raw[i : i + ID_BYTES] for i in range(0, len(raw), ID_BYTES))
    geohash = None
    if _GEOHASH in known:
        geohash = _utf8(known[_GEOHASH], "geohash")
        if len(geohash) > MAX_GEOHASH or not geohash.isascii():
            raise RemoteProtocolError(f"announce geohash {geohash!r} is not up to {MAX_GEOHASH} ASCII characters")
    return Announcement(
        nickname=_utf8(known[_NICKNAME], "nickname"),
        noise_public_key=known[_NOISE],
        signing_public_key=known[_SIGNING],
        neighbours=neighbours,
        capabilities=known.get(_CAPABILITIES),
        geohash=geohash,
        extensions=tuple(extensions),
    )


# ---------------------------------------------------------------------------- inside Noise


@dataclass(frozen=True)
class NoisePayload:
    """A Noise transport plaintext: a type (``BitchatProtocol.swift``: 0x01 private message, ...) and data."""

    type: int
    data: bytes


_FILE_ALIAS = 0x09
"""Old clients' privateFile code; decoded as 0x20 (privateFile)."""


def encode_noise_payload(payload: NoisePayload) -> bytes:
    """Type byte then data."""
    if not 0 <= payload.type <= 0xFF:
        raise LocalProtocolError(f"noise payload type must be a byte, got {payload.type!r}")
    return bytes([payload.type]) + payload.data


def decode_noise_payload(data: bytes) -> NoisePayload:
    """Type byte then data; the old file alias 0x09 reads as 0x20.

    Raises:
        RemoteProtocolError: empty plaintext.
    """
    if not data:
        raise RemoteProtocolError("empty noise payload has no type byte")
    kind = 0x20 if data[0] == _FILE_ALIAS else data[0]
    return NoisePayload(kind, data[1:])


@dataclass(frozen=True)
class PrivateMessage:
    """A private message's id and text."""

    message_id: str
    content: str


def encode_private_message(message: PrivateMessage) -> bytes:
    """TLVs 0x00 id, 0x01 content.

    Raises:
        LocalProtocolError: id or content over 255 UTF-8 bytes.
    """
    return _tlv(0x00, message.message_id.encode()) + _tlv(0x01, message.content.encode())


def decode_private_message(data: bytes) -> PrivateMessage:
    """TLVs 0x00 id, 0x01 content, both required; others skipped.

    Raises:
        RemoteProtocolError: truncated, missing a field, or not UTF-8.
    """
    fields = dict(_tlvs(data, "private message"))
    for kind in (0x00, 0x01):
        if kind not in fields:
            raise RemoteProtocolError(f"private message lacks TLV 0x{kind:02x}")
    return PrivateMessage(_utf8(fields[0x00], "message id"), _utf8(fields[0x01], "content"))
