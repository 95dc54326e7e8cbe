"""Kademlia (``/ipfs/kad/1.0.0``): its messages, XOR distance and a k-bucket routing table, sans-I/O.

Messages are uvarint-framed ``Message`` protobufs::

    Message { 1 type, 2 key, 8 closerPeers (repeated Peer), 9 providerPeers (repeated Peer) }
    Peer    { 1 id (peer id multihash), 2 addrs (repeated binary multiaddr), 3 connection }
    type:   PUT_VALUE 0, GET_VALUE 1, ADD_PROVIDER 2, GET_PROVIDERS 3, FIND_NODE 4, PING 5

Distance is ``XOR(sha256(a), sha256(b))`` of the keys (a peer's key is its id's
multihash bytes); a :class:`RoutingTable` keeps at most :data:`K` peers per bucket
(the bucket is the distance's bit length), the least recently seen first out when
a full bucket must take a newcomer (the caller first pings it: Kademlia prefers
peers that stay up).
"""

from __future__ import annotations

import enum
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

from .peerid import Multiaddr, PeerId
from .protobuf import encode_bytes_field, encode_varint_field, parse_fields

__all__ = ["KAD_PROTOCOL", "MAX_PEERS", "K", "KadMessage", "KadPeer", "MessageType", "RoutingTable", "distance"]

KAD_PROTOCOL = "/ipfs/kad/1.0.0"
K = 20
MAX_PEERS = 64
"""Peers one message may list (a FIND_NODE answer carries K)."""
MAX_KEY = 256
MAX_ADDRS = 16


class MessageType(enum.IntEnum):
    PUT_VALUE = 0
    GET_VALUE = 1
    ADD_PROVIDER = 2
    GET_PROVIDERS = 3
    FIND_NODE = 4
    PING = 5


@dataclass(frozen=True, slots=True)
class KadPeer:
    peer_id: PeerId
    addrs: tuple[Multiaddr, ...] = ()
    connection: int = 0

    def encode(self) -> bytes:
        out = encode_bytes_field(1, self.peer_id.multihash)
        out += b"".join(encode_bytes_field(2, a.to_bytes()) for a in self.addrs)
        return out + encode_varint_field(3, self.connection)

    @classmethod
    def decode(cls, data: bytes) -> KadPeer:
        fields = parse_fields(data)
        ids, addrs = _bytes(fields, 1), _bytes(fields, 2)
        if len(ids) != 1 or len(addrs) > MAX_ADDRS:
            raise RemoteProtocolError(f"kad: a peer has one id and at most {MAX_ADDRS} addresses")
        connection = fields.get(3, [0])[-1]
        if not isinstance(connection, int):
            raise RemoteProtocolError("kad: a peer's connection type must be a varint")
        return cls(PeerId(ids[0]), tuple(Multiaddr.from_bytes(a) for a in addrs), connection)


@dataclass(frozen=True, slots=True)
class KadMessage:
    type: MessageType
    key: bytes = b""
    closer_peers: tuple[KadPeer, ...] = ()
    provider_peers: tuple[KadPeer, ...] = ()

    def __post_init__(self) -> None:
        if len(self.key) > MAX_KEY or len(self.closer_peers) + len(self.provider_peers) > MAX_PEERS:
            raise LocalProtocolError(f"kad: a key of at most {MAX_KEY} bytes and at most {MAX_PEERS} peers")

    def encode(self) -> bytes:
        out = encode_varint_field(1, self.type) + encode_bytes_field(2, self.key)
        out += b"".join(encode_bytes_field(8, p.encode()) for p in self.closer_peers)
        return out + b"".join(encode_bytes_field(9, p.encode()) for p in self.provider_peers)

    @classmethod
    def decode(cls, data: bytes) -> KadMessage:
        fields = parse_fields(data)
        kind = fields.get(1, [None])[-1]
        if not isinstance(kind, int) or kind not in MessageType._value2member_map_:
            raise RemoteProtocolError(f"kad: message type {kind!r} is not one of {[t.value for t in MessageType]}")
        keys, closer, providers = _bytes(fields, 2), _bytes(fields, 8), _bytes(fields, 9)
        key = keys[-1] if keys else b""
        if len(key) > MAX_KEY or len(closer) + len(providers) > MAX_PEERS:
            raise RemoteProtocolError(f"kad: a key above {MAX_KEY} bytes or more than {MAX_PEERS} peers")
        return cls(
            MessageType(kind),
            key,
            tuple(KadPeer.decode(p) for p in closer),
            tuple(KadPeer.decode(p) for p in providers),
        )


def _bytes(fields: dict[int, list[int | bytes]], number: int) -> list[bytes]:
    values = fields.get(number, [])
    if not all(isinstance(v, bytes) for v in values):
        raise RemoteProtocolError(f"kad: field {number} must be bytes")
    return [v for v in values if isinstance(v, bytes)]


def distance(a: bytes, b: bytes) -> int:
    """Kademlia's distance between two keys: the XOR of their SHA-256 digests, as an int."""
    return int.from_bytes(hashlib.sha256(a).digest(), "big") ^ int.from_bytes(hashlib.sha256(b).digest(), "big")


class RoutingTable:
    """The k-buckets around ``own`` (a peer id): at most ``k`` peers per bucket, least recently seen first."""

    def __init__(self, own: PeerId, k: int = K) -> None:
        self.own = own
        self.k = k
        self._buckets: dict[int, OrderedDict[bytes, KadPeer]] = {}

    def _bucket(self, peer_id: PeerId) -> int:
        return distance(self.own.multihash, peer_id.multihash).bit_length()

    def __len__(self) -> int:
        return sum(map(len, self._buckets.values()))

    def seen(self, peer: KadPeer) -> KadPeer | None:
        """``peer`` was heard from: it moves to its bucket's end. Returns None, or, when the bucket is
        full, the bucket's least recently seen peer: the caller pings it and calls :meth:`evict` if it
        is gone, else :meth:`seen` for it (and ``peer`` is not added)."""
        if peer.peer_id == self.own:
            return None
        bucket = self._buckets.setdefault(self._bucket(peer.peer_id), OrderedDict())
        key = peer.peer_id.multihash
        if key in bucket or len(bucket) < self.k:
            bucket.pop(key, None)
            bucket[key] = peer
            return None
        return next(iter(bucket.values()))

    def evict(self, peer_id: PeerId) -> bool:
        bucket = self._buckets.get(self._bucket(peer_id), OrderedDict())
        return bucket.pop(peer_id.multihash, None) is not None

    def closest(self, key: bytes, count: int = K) -> list[KadPeer]:
        """The ``count`` known peers closest to ``key``, closest first."""
        peers = [p for bucket in self._buckets.values() for p in bucket.values()]
        return sorted(peers, key=lambda p: distance(key, p.peer_id.multihash))[:count]
