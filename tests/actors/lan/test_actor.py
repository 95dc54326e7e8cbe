"""The LAN actor on a real bus: beacons reach peers_to, discovery is answered through the acceptor, probes."""

from __future__ import annotations

import asyncio
import queue
import time
from typing import Any

from nacl.signing import SigningKey

from tests.actors.acceptor.support import CAPS, WAIT, Sink, free_udp_port, start
from villagemesh.actors.acceptor.actor import AcceptorActor, acceptor_status
from villagemesh.actors.lan.actor import GOSSIP_MIN_S, LanActor, lan_status, probe_peer
from villagemesh.actors.lan.beacon import BeaconConfig, BeaconEndpoint
from villagemesh.actors.lan.identity import Identity
from villagemesh.actors.lan.messages import PeerAnnounced, PeerProbed, ProbeFailed
from villagemesh.actors.lan.tcp import probe
from villagemesh.protocols.discovery import DiscoveryRequest, decode_discovery


def test_lan_actor_hears_beacons_answers_discovery_and_probes(runtime: Any) -> None:
    """A neighbour's beacon reaches peers_to; the acceptor's port answers discovery; ProbePeer reports back."""
    inbox: queue.Queue[Any] = queue.Queue()
    start(runtime, Sink, "sink", queue=inbox)
    start(runtime, AcceptorActor, "acceptor", routes={"discovery": "lan"})
    client = runtime.bus.client()
    port = acceptor_status(client).port
    me = Identity(SigningKey.generate(), (f"ws://127.0.0.1:{port}",), CAPS, port)
    beacon = BeaconConfig(interface="127.0.0.1", port=free_udp_port(), broadcast_address="127.255.255.255")
    start(runtime, LanActor, "lan", identity=me, beacon=beacon, peers_to="sink")
    assert lan_status(client).mode == "multicast"  # answered after on_start: the beacon socket is open

    neighbour = Identity(SigningKey.generate(), ("ws://127.0.0.1:1",), CAPS, 1)

    async def outside() -> str:
        endpoint = BeaconEndpoint(neighbour, lambda a, b, s: None, beacon)
        await endpoint.start()
        asking = DiscoveryRequest(node_id=neighbour.node_id, addresses=(), capabilities=CAPS, timestamp=0.0)
        response = (await probe("127.0.0.1", port, 5.0, request=asking)).response
        await endpoint.close()
        return response.node_id

    assert asyncio.run(outside()) == me.node_id
    announced = inbox.get(timeout=WAIT)
    assert isinstance(announced, PeerAnnounced) and announced.node_id == neighbour.node_id
    assert decode_discovery(announced.announce).node_id == neighbour.node_id  # re-verifiable by the receiver

    probe_peer(client, "127.0.0.1", port, reply_to="sink")
    probed = inbox.get(timeout=WAIT)
    assert isinstance(probed, PeerProbed) and probed.node_id == me.node_id and probed.latency_ms > 0

    time.sleep(3 * GOSSIP_MIN_S)  # a gossip tick would have come by now
    status = lan_status(client)
    assert status.mode == "multicast"
    assert status.responder["answered"] == 2 and status.beacon["accepted"] >= 1
    # a peer heard by its own beacon is on our link: no gossip tick pulls it (one would have
    # come GOSSIP_MIN_S after it was heard, and failed: nothing listens on its port 1)
    assert status.exchange.get("gossip_pulls", 0) == 0


def test_probe_of_nobody_reports_a_connect_error(runtime: Any) -> None:
    """ProbePeer of a closed port comes back as ProbeFailed naming the address."""
    inbox: queue.Queue[Any] = queue.Queue()
    start(runtime, Sink, "sink", queue=inbox)
    me = Identity(SigningKey.generate(), (), CAPS, 1)
    beacon = BeaconConfig(interface="127.0.0.1", port=free_udp_port())
    start(runtime, LanActor, "lan", identity=me, beacon=beacon)
    probe_peer(runtime.bus.client(), "127.0.0.1", 9, reply_to="sink", timeout=2.0)
    failed = inbox.get(timeout=WAIT)
    assert isinstance(failed, ProbeFailed) and failed.error == "ConnectError" and "127.0.0.1:9" in failed.reason
