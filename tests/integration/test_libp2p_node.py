"""Two villagemesh nodes in hybrid mode over the libp2p transport: delivery, failover to WebSocket and back."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests import test_node
from tests.conftest import WAIT
from villagemesh.actors.libp2p.actor import libp2p_status
from villagemesh.node import Node

pytestmark = pytest.mark.slow

pair = test_node.pair
"""Two hybrid nodes, b bootstrapped from a (the node tests' fixture)."""


def events(node: Node, name: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, node.log_path.read_text().splitlines()) if e["event"] == name]


def delivered_over(node: Node, count: int) -> list[str]:
    """The transports of the sender's first ``count`` deliveries (waits for their log lines)."""
    deadline = time.monotonic() + WAIT
    while True:
        done = [t for e in events(node, "messages_delivered") for t in [e["transports"]] * e["count"]]
        if len(done) >= count or time.monotonic() > deadline:
            return [",".join(t) for t in done]
        threading.Event().wait(0.05)


def test_the_announce_carries_the_libp2p_multiaddr_of_the_node_key(pair: tuple[Node, Node]) -> None:
    a, b = pair
    [peer] = [p for p in b.peers() if p.peer_id == a.node_id]
    assert dict(peer.addresses)["libp2p"] == (a.libp2p_address,)
    assert a.libp2p_address.endswith("/p2p/" + libp2p_status(a._client()).peer_id)


def test_hybrid_nodes_deliver_over_libp2p_fail_over_to_websocket_when_it_crashes_and_come_back(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    a.subscribe("DATA", lambda message: None)
    assert b.send(a.node_id, b"over libp2p").result(WAIT).delivered
    assert delivered_over(b, 1) == ["libp2p"]
    a_status = libp2p_status(a._client())
    assert b.node_id in a_status.peers  # it came in on a's port, through the acceptor
    assert a_status.counts.get("dials", 0) == 0  # and a's ack went back on that one connection
    b.subscribe("DATA", lambda message: None)
    assert a.send(b.node_id, b"back the other way").result(WAIT).delivered
    assert set(delivered_over(a, 1)) == {"libp2p"}  # (its outcome reports to b are deliveries too)
    assert libp2p_status(a._client()).counts.get("dials", 0) == 0  # one connection per peer, either direction

    # Crashed with a stream of messages in flight: those fail over to WebSocket at once.
    handles = b.send_many([(a.node_id, b"in flight %d" % n) for n in range(200)])
    b.crash("libp2p")
    assert all(h.result(WAIT).delivered for h in handles)
    deadline = time.monotonic() + WAIT
    while not events(b, "child_restarted") and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    for n in range(5):  # once libp2p is back, deliveries use it again
        assert b.send(a.node_id, b"after %d" % n).result(WAIT).delivered
    transports = delivered_over(b, 206)
    assert "websocket" in transports[1:201], transports
    assert transports[-5:] == ["libp2p"] * 5, transports
    crashed = [e["child_id"] for e in events(b, "child_crashed")]
    restarted = [e["child_id"] for e in events(b, "child_restarted")]
    assert crashed == ["libp2p"] and restarted == ["libp2p"]  # it restarted alone


def test_nodes_find_each_other_through_kademlia_alone(tmp_path: Path) -> None:
    """No LAN, no discovery bootstrap: b knows only a's multiaddr as a Kademlia peer; both end up in each
    other's registry (b finds a as a provider of the well-known key, a finds b's provider record)."""
    a = test_node.make(tmp_path, "a", discovery_interval=0.3).start()
    b = test_node.make(tmp_path, "b", discovery_interval=0.3, libp2p_bootstrap=(a.libp2p_address,)).start()
    try:
        assert b.wait_for_peers(1, WAIT) and a.wait_for_peers(1, WAIT)
        assert [p.peer_id for p in b.peers()] == [a.node_id] and [p.peer_id for p in a.peers()] == [b.node_id]
        sources = {e["source"] for e in events(b, "peer_discovered")}
        assert sources == {"libp2p"}, sources
        a.subscribe("DATA", lambda message: None)
        assert b.send(a.node_id, b"found through the DHT").result(WAIT).delivered
    finally:
        b.stop()
        a.stop()
