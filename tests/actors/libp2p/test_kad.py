"""Kademlia's full buckets on real hosts: the least recently seen peer is PINGed; it stays if it answers."""

from __future__ import annotations

import asyncio
import socket

from tests.actors.acceptor.support import run
from tests.actors.libp2p.test_host import listening
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.libp2p.host import Libp2pHost
from villagemesh.actors.libp2p.kad import Kademlia
from villagemesh.protocols.libp2p.kad import KadPeer, distance
from villagemesh.protocols.libp2p.peerid import Multiaddr, PeerId


def _refused_address() -> Multiaddr:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    return Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{port}")


def _in_the_bucket_of(own: PeerId, other: PeerId) -> PeerId:
    """A fresh peer id in the same k-bucket around ``own`` as ``other``."""
    wanted = distance(own.multihash, other.multihash).bit_length()
    while True:
        candidate = PeerId.from_ed25519(NodeKeys.generate().identity)
        if distance(own.multihash, candidate.multihash).bit_length() == wanted:
            return candidate


def test_a_full_bucket_keeps_its_old_peer_while_it_answers_and_gives_its_place_up_when_it_does_not() -> None:
    async def body() -> None:
        async with listening() as live:
            Kademlia(live)  # the old peer serves kad, so it answers a PING
            live_peer = KadPeer(live.peer_id, live.listen)
            ours = Libp2pHost(NodeKeys.generate(), lambda m, raw, node_id: None)
            try:
                kad = Kademlia(ours, k=1)
                kad.seen(live_peer)
                newcomer = KadPeer(_in_the_bucket_of(ours.peer_id, live.peer_id), (_refused_address(),))
                kad.seen(newcomer)  # the bucket is full: live is PINGed, answers and stays
                await asyncio.gather(*kad._checking.values())
                assert [p.peer_id for p in kad.table.closest(live.peer_id.multihash)] == [live.peer_id]
                assert ours.counts["kad_eviction_kept"] == 1 and ours.counts["kad_evicted"] == 0

                gone = Kademlia(ours, k=1)
                gone.seen(newcomer)  # now the old peer is one nobody answers for
                gone.seen(live_peer)
                gone.seen(KadPeer(_in_the_bucket_of(ours.peer_id, live.peer_id), live.listen))  # one check at a time
                await asyncio.gather(*gone._checking.values())
                assert [p.peer_id for p in gone.table.closest(live.peer_id.multihash)] == [live.peer_id]
                assert ours.counts["kad_evicted"] == 1 and ours.counts["kad_newcomers_dropped"] == 1
            finally:
                await ours.close()

    run(body())
