"""Kademlia ``/ipfs/kad/1.0.0`` on the libp2p host: a server for peers' queries and a client for ours.

The messages, XOR distance and k-buckets are :mod:`villagemesh.protocols.libp2p.kad`'s;
the provider records are :class:`~.state.ProviderStore`'s (pure). Here they meet streams::

    peer ──/ipfs/kad/1.0.0──▶ serve: FIND_NODE → our K closest; GET_PROVIDERS → the key's providers
                              and our K closest; ADD_PROVIDER → stored (only the sender's own record);
                              PING → PING; PUT/GET_VALUE → an empty answer (we keep no values)
    us   ──lookup(key)──▶ iterative FIND_NODE, ALPHA queries at a time, until the K closest answered
         ──provide(key)──▶ lookup, then ADD_PROVIDER (us, our address) to those K
         ──providers(key)──▶ GET_PROVIDERS along the same walk

Every peer that answers us is ``seen`` by the routing table (with the addresses we
reached it at or it was listed with); a full bucket keeps its old peers (Kademlia
prefers peers that stay up; no eviction ping here). A request gets
:data:`REQUEST_TIMEOUT_S`; a peer that times out or fails is left out of that walk.
An ADD_PROVIDER is sent without waiting for an answer (go-libp2p sends none,
py-libp2p echoes it: both are fine, research/libp2p.md §2.1).

:data:`PROVIDER_KEY` is the well-known key every villagemesh node provides, so nodes
find each other through any libp2p DHT.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from villagemesh.actors.libp2p.state import ProviderStore
from villagemesh.errors import ProtocolError, RemoteProtocolError, TransportError
from villagemesh.protocols.libp2p.kad import (
    KAD_PROTOCOL,
    K,
    KadMessage,
    KadPeer,
    MessageType,
    RoutingTable,
    distance,
)
from villagemesh.protocols.libp2p.peerid import Multiaddr, PeerId
from villagemesh.protocols.libp2p.varint import frame

__all__ = ["ALPHA", "MAX_KAD_MESSAGE", "PROVIDER_KEY", "REQUEST_TIMEOUT_S", "Kademlia", "dialable"]

PROVIDER_KEY = bytes([0x12, 0x20]) + hashlib.sha256(b"/villagemesh/nodes/1.0.0").digest()
"""The key villagemesh nodes provide: the sha2-256 multihash of ``/villagemesh/nodes/1.0.0``
(hex ``1220…`` as py-libp2p's ``provide`` takes it)."""

ALPHA = 3
"""Queries in flight at once during a lookup (the Kademlia paper's α)."""

REQUEST_TIMEOUT_S = 5.0
"""One request's answer, connection included: a peer slower than that is left out of the walk."""

MAX_KAD_MESSAGE = 64 * 1024
"""One kad message: 64 peers with a few addresses each fit many times over."""

MAX_ROUNDS = 10
"""Walk steps of one lookup: each halves the distance, so 10 covers any DHT that answers."""


class Kademlia:
    """Kademlia for one :class:`~.host.Libp2pHost` (``host.handlers`` gets the protocol)."""

    def __init__(self, host: Any, *, clock: Any = time.time) -> None:
        self.host = host
        self.table = RoutingTable(host.peer_id)
        self.providers = ProviderStore()
        self.clock = clock
        host.handlers[KAD_PROTOCOL] = self.serve

    def me(self) -> KadPeer:
        return KadPeer(self.host.peer_id, self.host.listen)

    def add(self, address: str) -> None:
        """A peer we know the full multiaddr of (a bootstrap address): into the routing table."""
        multiaddr = Multiaddr.parse(address)
        peer_id = multiaddr.peer_id()
        if peer_id is None:
            raise RemoteProtocolError(f"kad: {address!r} has no /p2p/ part")
        self.table.seen(KadPeer(peer_id, (_bare(multiaddr),)))

    # -- server -------------------------------------------------------------------------------------

    async def serve(self, stream: Any) -> None:
        """Answer every request on one inbound stream until the peer closes it."""
        remote: PeerId = stream.remote
        while await stream.more():
            request = KadMessage.decode(await stream.read_frame(MAX_KAD_MESSAGE))
            self.host.counts[f"kad_served_{request.type.name.lower()}"] += 1
            answer = self.answer(request, remote)
            if answer is not None:
                await stream.write(frame(answer.encode()))

    def answer(self, request: KadMessage, remote: PeerId) -> KadMessage | None:
        """Our answer to ``request`` from ``remote`` (None: none is sent)."""
        kind = request.type
        if kind is MessageType.FIND_NODE:
            return KadMessage(kind, request.key, tuple(self._closest(request.key, remote)))
        if kind is MessageType.GET_PROVIDERS:
            providers = tuple(self.providers.get(request.key, self.clock()))
            room = max(0, 60 - len(providers))
            return KadMessage(kind, request.key, tuple(self._closest(request.key, remote))[: min(K, room)], providers)
        if kind is MessageType.ADD_PROVIDER:
            for peer in request.provider_peers:
                if peer.peer_id == remote and peer.addrs:  # only a peer's own record, as the spec says
                    self.providers.add(request.key, peer, self.clock())
            return None
        return KadMessage(kind, request.key)  # PING, and values we do not keep: an empty answer

    def _closest(self, key: bytes, exclude: PeerId | None = None) -> list[KadPeer]:
        return [p for p in self.table.closest(key, K + 1) if p.peer_id != exclude][:K]

    # -- client -------------------------------------------------------------------------------------

    async def request(self, peer: KadPeer, message: KadMessage, *, answer: bool = True) -> KadMessage | None:
        """Send ``message`` to ``peer`` on a new kad stream; its answer (None when ``answer`` is False).

        Raises:
            TransportError, ProtocolError: the peer could not be reached or answered wrongly.
        """
        address = dialable(peer)
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            stream = await self.host.open_stream(address, KAD_PROTOCOL)
            try:
                await stream.write(frame(message.encode()))
                if not answer:
                    return None
                reply = KadMessage.decode(await stream.read_frame(MAX_KAD_MESSAGE))
            finally:
                stream.close()
        self.table.seen(KadPeer(peer.peer_id, peer.addrs))
        return reply

    async def walk(self, key: bytes, kind: MessageType = MessageType.FIND_NODE) -> tuple[list[KadPeer], set[KadPeer]]:
        """An iterative lookup of ``key``: the K closest peers that answered, and any providers met."""
        me = self.host.peer_id
        candidates: dict[bytes, KadPeer] = {p.peer_id.multihash: p for p in self.table.closest(key)}
        asked: set[bytes] = set()
        answered: dict[bytes, KadPeer] = {}
        providers: set[KadPeer] = set()
        for _ in range(MAX_ROUNDS):
            order = sorted(candidates.values(), key=lambda p: _distance(key, p))
            batch = [p for p in order if p.peer_id.multihash not in asked and p.addrs][:ALPHA]
            if not batch:
                break
            asked.update(p.peer_id.multihash for p in batch)
            replies = await asyncio.gather(*(self._ask(p, KadMessage(kind, key)) for p in batch))
            for peer, reply in zip(batch, replies, strict=True):
                if reply is None:
                    candidates.pop(peer.peer_id.multihash, None)
                    continue
                answered[peer.peer_id.multihash] = peer
                providers.update(p for p in reply.provider_peers if p.addrs)
                for found in reply.closer_peers:
                    if found.peer_id != me and found.peer_id.multihash not in candidates:
                        candidates[found.peer_id.multihash] = KadPeer(
                            found.peer_id, tuple(_bare(a) for a in found.addrs)
                        )
            closest = sorted(answered.values(), key=lambda p: _distance(key, p))[:K]
            if len(closest) >= K and all(p.peer_id.multihash in asked for p in order[:K]):
                break
        return sorted(answered.values(), key=lambda p: _distance(key, p))[:K], providers

    async def _ask(self, peer: KadPeer, message: KadMessage) -> KadMessage | None:
        try:
            return await self.request(peer, message)
        except (TransportError, ProtocolError, TimeoutError) as exc:
            self.host.counts["kad_requests_failed"] += 1
            self.host.log.info(
                "kad_request_failed", peer_id=str(peer.peer_id), reason=str(exc), error=type(exc).__name__
            )
            return None

    async def find_node(self, key: bytes) -> list[KadPeer]:
        """The K closest peers to ``key`` that answered."""
        closest, _ = await self.walk(key)
        return closest

    async def provide(self, key: bytes) -> int:
        """Tell the K closest peers to ``key`` that we provide it; how many were told."""
        closest, _ = await self.walk(key)
        me = self.me()
        self.providers.add(key, me, self.clock())
        sent = 0
        for peer in closest:
            try:
                await self.request(peer, KadMessage(MessageType.ADD_PROVIDER, key, (), (me,)), answer=False)
                sent += 1
            except (TransportError, ProtocolError, TimeoutError) as exc:
                self.host.log.info(
                    "kad_request_failed", peer_id=str(peer.peer_id), reason=str(exc), error=type(exc).__name__
                )
        return sent

    async def find_providers(self, key: bytes) -> list[KadPeer]:
        """Providers of ``key``: ours, and those the walk towards it met (each once, ourselves excluded)."""
        _, found = await self.walk(key, MessageType.GET_PROVIDERS)
        found.update(self.providers.get(key, self.clock()))
        unique = {p.peer_id.multihash: p for p in found if p.peer_id != self.host.peer_id}
        return list(unique.values())


def _distance(key: bytes, peer: KadPeer) -> int:
    return distance(key, peer.peer_id.multihash)


def _bare(multiaddr: Multiaddr) -> Multiaddr:
    """``multiaddr`` without its ``/p2p/`` part (peers list addresses both ways)."""
    return Multiaddr(tuple(part for part in multiaddr.parts if part[0] != "p2p"))


def dialable(peer: KadPeer) -> str:
    """The first TCP address of ``peer``, with its ``/p2p/`` id."""
    for address in peer.addrs:
        if address.value("tcp") is not None and (address.value("ip4") or address.value("ip6")):
            return f"{_bare(address)}/p2p/{peer.peer_id}"
    raise TransportError(f"kad: peer {peer.peer_id} lists no TCP address")
