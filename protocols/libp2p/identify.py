"""``/ipfs/id/1.0.0`` identify and ``/ipfs/ping/1.0.0`` ping, sans-I/O.

Identify: the responder writes one uvarint-framed ``Identify`` protobuf and closes::

    1 publicKey (PublicKey proto)   2 listenAddrs (binary multiaddrs, repeated)
    3 protocols (repeated)          4 observedAddr (binary multiaddr)
    5 protocolVersion               6 agentVersion
    (8 signedPeerRecord, and any other field: read past, not kept)

Ping: the dialer writes :data:`PING_BYTES` random bytes, the listener echoes them; a
reply that differs is a :class:`RemoteProtocolError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

from .peerid import Multiaddr, PeerId
from .protobuf import encode_bytes_field, parse_fields

__all__ = ["IDENTIFY_PROTOCOL", "MAX_IDENTIFY", "PING_BYTES", "PING_PROTOCOL", "Identify", "check_pong"]

IDENTIFY_PROTOCOL = "/ipfs/id/1.0.0"
PING_PROTOCOL = "/ipfs/ping/1.0.0"
PING_BYTES = 32
MAX_IDENTIFY = 64 * 1024
"""An identify message of py-libp2p is ~500 bytes; 64 KiB leaves room for many addresses and protocols."""
MAX_ITEMS = 128
"""Addresses or protocols one identify may list."""


@dataclass(frozen=True, slots=True)
class Identify:
    """What a peer says about itself (all optional but the key, which names it)."""

    public_key: bytes
    listen_addrs: tuple[Multiaddr, ...] = ()
    protocols: tuple[str, ...] = ()
    observed_addr: Multiaddr | None = None
    protocol_version: str = ""
    agent_version: str = ""

    def __post_init__(self) -> None:
        if len(self.listen_addrs) > MAX_ITEMS or len(self.protocols) > MAX_ITEMS:
            raise LocalProtocolError(f"identify: at most {MAX_ITEMS} addresses and protocols")

    @property
    def peer_id(self) -> PeerId:
        return PeerId.from_public_key_proto(self.public_key)

    def encode(self) -> bytes:
        out = encode_bytes_field(1, self.public_key)
        out += b"".join(encode_bytes_field(2, a.to_bytes()) for a in self.listen_addrs)
        out += b"".join(encode_bytes_field(3, p.encode()) for p in self.protocols)
        if self.observed_addr is not None:
            out += encode_bytes_field(4, self.observed_addr.to_bytes())
        out += encode_bytes_field(5, self.protocol_version.encode())
        out += encode_bytes_field(6, self.agent_version.encode())
        if len(out) > MAX_IDENTIFY:
            raise LocalProtocolError(f"identify: {len(out)} bytes is more than {MAX_IDENTIFY}")
        return out

    @classmethod
    def decode(cls, data: bytes) -> Identify:
        """From the protobuf; :class:`RemoteProtocolError` naming what is wrong."""
        if len(data) > MAX_IDENTIFY:
            raise RemoteProtocolError(f"identify: {len(data)} bytes is more than {MAX_IDENTIFY}")
        fields = parse_fields(data)
        keys = _bytes_of(fields, 1)
        if len(keys) != 1:
            raise RemoteProtocolError(f"identify: exactly one publicKey, got {len(keys)}")
        addrs, protocols, observed = _bytes_of(fields, 2), _bytes_of(fields, 3), _bytes_of(fields, 4)
        if len(addrs) > MAX_ITEMS or len(protocols) > MAX_ITEMS or len(observed) > 1:
            raise RemoteProtocolError(f"identify: more than {MAX_ITEMS} addresses or protocols, or two observedAddr")
        return cls(
            keys[0],
            tuple(Multiaddr.from_bytes(a) for a in addrs),
            tuple(_text(p, "protocol") for p in protocols),
            Multiaddr.from_bytes(observed[0]) if observed else None,
            _text(_one(fields, 5), "protocolVersion"),
            _text(_one(fields, 6), "agentVersion"),
        )


def _bytes_of(fields: dict[int, list[int | bytes]], number: int) -> list[bytes]:
    values = fields.get(number, [])
    if not all(isinstance(v, bytes) for v in values):
        raise RemoteProtocolError(f"identify: field {number} must be bytes")
    return [v for v in values if isinstance(v, bytes)]


def _one(fields: dict[int, list[int | bytes]], number: int) -> bytes:
    values = _bytes_of(fields, number)
    return values[-1] if values else b""  # protobuf: the last of a repeated scalar wins


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"identify: {what} is not UTF-8: {value[:40]!r}") from exc


def check_pong(sent: bytes, received: bytes) -> None:
    """A ping's answer must be its bytes, exactly."""
    if received != sent:
        raise RemoteProtocolError(f"ping: sent {sent.hex()[:16]}…, the peer answered {received.hex()[:16]}…")
