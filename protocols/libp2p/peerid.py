"""libp2p peer ids and multiaddrs (the ``ip4``, ``ip6``, ``tcp`` and ``p2p`` parts), sans-I/O.

A peer id is a multihash of the peer's public key in libp2p's protobuf form
(``PublicKey{1: type, 2: data}``; Ed25519 is type 1, so ``08 01 12 20 <32 bytes>``):
keys of at most 42 bytes are *inlined* with the identity multihash (``00 <len> <key>``,
which is why Ed25519 ids start ``12D3KooW`` in base58btc), larger ones hashed
(``12 20 <sha256>``, ids starting ``Qm``). Text forms: base58btc, or a CIDv1 with the
``libp2p-key`` codec (0x72) in multibase base32 (``b…``). A villagemesh node's peer
id is the identity multihash of its Ed25519 node key, so node id and peer id name
the same key.

A multiaddr is a sequence of ``(protocol, value)``; text ``/ip4/10.0.0.1/tcp/4001/p2p/12D3…``,
binary ``uvarint(code) ‖ value`` per part (ip4 4 bytes, ip6 16, tcp a big-endian u16,
p2p ``uvarint(len) ‖ multihash``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
from dataclasses import dataclass

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

from ..framing import NEED_DATA
from .varint import decode_uvarint, encode_uvarint

__all__ = [
    "ED25519_KEY_PROTO_PREFIX",
    "Multiaddr",
    "PeerId",
    "b58decode",
    "b58encode",
]

ED25519_KEY_PROTO_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])
"""``PublicKey{type: Ed25519, data: <32 bytes>}`` before its data."""
_IDENTITY, _SHA256 = 0x00, 0x12
_MAX_INLINE = 42
_LIBP2P_KEY = 0x72
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
MAX_TEXT = 256
"""Characters of a peer id or multiaddr text read at most (both are short by nature)."""
PARSED_MEMORY = 1024
"""Multiaddr texts whose parse is remembered (least recently used forgotten first): every announce
of a peer carries the same few, and a parse with a ``p2p`` part costs two base58 passes."""


def b58encode(data: bytes) -> str:
    """Base58btc (Bitcoin's alphabet; leading zero bytes as ``1``)."""
    zeros = len(data) - len(data.lstrip(b"\0"))
    number, out = int.from_bytes(data, "big"), ""
    while number:
        number, digit = divmod(number, 58)
        out = _B58[digit] + out
    return "1" * zeros + out


def b58decode(text: str) -> bytes:
    """The bytes of a base58btc string; :class:`RemoteProtocolError` naming a character not in the alphabet."""
    if len(text) > MAX_TEXT:
        raise RemoteProtocolError(f"base58: {len(text)} characters is longer than {MAX_TEXT}")
    number = 0
    for char in text:
        digit = _B58_INDEX.get(char)
        if digit is None:
            raise RemoteProtocolError(f"base58: {char!r} is not a base58btc character (in {text[:60]!r})")
        number = number * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * zeros + body


@dataclass(frozen=True, slots=True)
class PeerId:
    """A peer id: its multihash bytes (identity or sha256), checked when made."""

    multihash: bytes

    def __post_init__(self) -> None:
        mh = self.multihash
        if not isinstance(mh, bytes) or len(mh) < 2:
            raise RemoteProtocolError(f"peer id: a multihash is at least 2 bytes, got {mh!r:.60}")
        code, size = mh[0], mh[1]
        if code == _IDENTITY and size <= _MAX_INLINE and len(mh) == 2 + size:
            return
        if code == _SHA256 and size == 32 and len(mh) == 34:
            return
        raise RemoteProtocolError(f"peer id: not an identity (<= 42 bytes) or sha256 multihash: {mh.hex()[:80]}")

    @classmethod
    def from_public_key_proto(cls, key_proto: bytes) -> PeerId:
        """The id of a key in libp2p's protobuf form: inlined up to 42 bytes, else its SHA-256."""
        if len(key_proto) <= _MAX_INLINE:
            return cls(bytes([_IDENTITY, len(key_proto)]) + key_proto)
        return cls(bytes([_SHA256, 32]) + hashlib.sha256(key_proto).digest())

    @classmethod
    def from_ed25519(cls, public_key: bytes) -> PeerId:
        """The id of an Ed25519 public key (32 bytes)."""
        if not isinstance(public_key, bytes) or len(public_key) != 32:
            raise LocalProtocolError(f"peer id: an Ed25519 public key is 32 bytes, got {public_key!r:.60}")
        return cls.from_public_key_proto(ED25519_KEY_PROTO_PREFIX + public_key)

    @classmethod
    def from_text(cls, text: str) -> PeerId:
        """From base58btc (``12D3…``, ``Qm…``) or a CIDv1 ``libp2p-key`` in base32 (``b…``)."""
        if not isinstance(text, str) or not text:
            raise RemoteProtocolError(f"peer id: expected text, got {text!r:.60}")
        if text[0] != "b":
            return cls(b58decode(text))
        if len(text) > MAX_TEXT:
            raise RemoteProtocolError(f"peer id: {len(text)} characters is longer than {MAX_TEXT}")
        body = text[1:].upper()
        try:
            raw = base64.b32decode(body + "=" * (-len(body) % 8))
        except ValueError as exc:
            raise RemoteProtocolError(f"peer id: {text!r:.60} is not base32") from exc
        if raw[:2] != bytes([0x01, _LIBP2P_KEY]):
            raise RemoteProtocolError(f"peer id: {text!r:.60} is not a CIDv1 with the libp2p-key codec")
        return cls(raw[2:])

    def to_base58(self) -> str:
        return b58encode(self.multihash)

    def to_cid(self) -> str:
        """The CIDv1 ``libp2p-key`` form, multibase base32 (lower case, no padding)."""
        return "b" + base64.b32encode(bytes([0x01, _LIBP2P_KEY]) + self.multihash).decode().lower().rstrip("=")

    def ed25519_public_key(self) -> bytes | None:
        """The Ed25519 key an identity multihash inlines, or None (a hashed id names no key by itself)."""
        inlined = self.multihash[2:]
        if self.multihash[0] == _IDENTITY and inlined[:4] == ED25519_KEY_PROTO_PREFIX and len(inlined) == 36:
            return inlined[4:]
        return None

    def __str__(self) -> str:
        return self.to_base58()


_CODES = {"ip4": 4, "tcp": 6, "ip6": 41, "p2p": 421}
_NAMES = {code: name for name, code in _CODES.items()}


@dataclass(frozen=True, slots=True)
class Multiaddr:
    """A multiaddr of ``ip4`` / ``ip6`` / ``tcp`` / ``p2p`` parts, as ``(name, value)`` pairs (values as text)."""

    parts: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        if not self.parts:
            raise RemoteProtocolError("multiaddr: no parts")
        for name, value in self.parts:
            self._value_bytes(name, value)  # every part checked when made

    @staticmethod
    def _value_bytes(name: str, value: str) -> bytes:
        try:
            if name == "ip4":
                return ipaddress.IPv4Address(value).packed
            if name == "ip6":
                return ipaddress.IPv6Address(value).packed
        except ValueError as exc:
            raise RemoteProtocolError(f"multiaddr: {value!r:.60} is not an {name} address") from exc
        if name == "tcp":
            if not value.isascii() or not value.isdigit() or int(value) > 65535 or str(int(value)) != value:
                raise RemoteProtocolError(f"multiaddr: tcp port {value!r:.20} is not 0 … 65535")
            return int(value).to_bytes(2, "big")
        if name == "p2p":
            multihash = PeerId.from_text(value).multihash
            return encode_uvarint(len(multihash)) + multihash
        raise RemoteProtocolError(f"multiaddr: protocol {name!r:.30} is not one of {sorted(_CODES)}")

    @classmethod
    def parse(cls, text: str) -> Multiaddr:
        """From ``/ip4/…/tcp/…[/p2p/…]`` text (the last :data:`PARSED_MEMORY` distinct texts are
        remembered: a multiaddr is immutable, and a text that fails is not remembered)."""
        if not isinstance(text, str) or not text.startswith("/") or len(text) > MAX_TEXT:
            raise RemoteProtocolError(f"multiaddr: {text!r:.60} is not '/proto/value/...' text")
        return _parse_multiaddr(text)

    @classmethod
    def from_bytes(cls, data: bytes) -> Multiaddr:
        """From the binary form."""
        parts, at = [], 0
        while at < len(data):
            head = decode_uvarint(data, at)
            if head is NEED_DATA:
                raise RemoteProtocolError("multiaddr: cut inside a protocol code")
            code, at = head
            name = _NAMES.get(code)
            if name is None:
                raise RemoteProtocolError(f"multiaddr: protocol code {code} is not one of {sorted(_NAMES)}")
            if name == "p2p":
                size = decode_uvarint(data, at)
                if size is NEED_DATA:
                    raise RemoteProtocolError("multiaddr: cut inside a p2p length")
                length, at = size
            else:
                length = {"ip4": 4, "ip6": 16, "tcp": 2}[name]
            value = data[at : at + length]
            if len(value) != length:
                raise RemoteProtocolError(f"multiaddr: {name} needs {length} bytes, {len(value)} left")
            at += length
            if name == "ip4":
                parts.append((name, str(ipaddress.IPv4Address(value))))
            elif name == "ip6":
                parts.append((name, str(ipaddress.IPv6Address(value))))
            elif name == "tcp":
                parts.append((name, str(int.from_bytes(value, "big"))))
            else:
                parts.append((name, str(PeerId(value))))
        return cls(tuple(parts))

    def to_bytes(self) -> bytes:
        return b"".join(encode_uvarint(_CODES[name]) + self._value_bytes(name, value) for name, value in self.parts)

    def __str__(self) -> str:
        return "".join(f"/{name}/{value}" for name, value in self.parts)

    def value(self, name: str) -> str | None:
        """The first value of protocol ``name``, or None."""
        return next((v for n, v in self.parts if n == name), None)

    def peer_id(self) -> PeerId | None:
        """The ``/p2p/`` part's peer id, or None."""
        text = self.value("p2p")
        return None if text is None else PeerId.from_text(text)


@functools.lru_cache(maxsize=PARSED_MEMORY)
def _parse_multiaddr(text: str) -> Multiaddr:
    words = text[1:].split("/")
    if len(words) % 2:
        raise RemoteProtocolError(f"multiaddr: {text!r:.60} has a protocol without its value")
    parts = tuple(zip(words[::2], words[1::2], strict=True))
    if any(name == "p2p" for name, _ in parts):  # the text form of a p2p part is kept canonical
        parts = tuple((n, str(PeerId.from_text(v)) if n == "p2p" else v) for n, v in parts)
    return Multiaddr(parts)
