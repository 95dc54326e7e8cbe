"""Whole nodes in the mesh mode on the in-memory BitChat radio: found by BitChat announces, delivered over bitchat.

Three nodes in a line (a - b - c, a and c out of each other's radio range), no
bootstrap, no LAN: the only way a and c learn of each other is a villagemesh
announce relayed over the BitChat mesh, and the only way a message gets from a
to c is bitchat (the mesh mode tries it first).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from villagemesh import create_network
from villagemesh.actors.bitchat.radio import MemoryAir
from villagemesh.protocols.bitchat import peer_id

pytestmark = pytest.mark.slow

WAIT = 30.0


def test_mesh_mode_nodes_find_each_other_over_bitchat_and_deliver_across_a_relay(tmp_path: Path) -> None:
    air = MemoryAir(live=True)
    nodes = []
    for name in ("a", "b", "c"):
        data = tmp_path / name
        data.mkdir()
        nodes.append(
            create_network(
                "mesh",
                name=name,
                data_dir=data,
                lan=False,
                bitchat_radio=air.radio,
                discovery_interval=0.3,
                ack_timeout=3.0,
            ).start()
        )
    a, _, c = nodes
    ids = [peer_id(n.keys.static_public) for n in nodes]
    air.set_link(ids[0], ids[1], True)
    air.set_link(ids[1], ids[2], True)
    try:
        assert a.wait_for_peers(2, WAIT) and c.wait_for_peers(2, WAIT)
        got = []
        arrived = threading.Event()
        c.subscribe("DATA", lambda m: (got.append(m), arrived.set()))
        status = a.send(c.node_id, b"over two radio hops").result(WAIT)
        assert status.delivered
        assert (
            arrived.wait(WAIT) and [m.payload for m in got] == [b"over two radio hops"] and got[0].sender == a.node_id
        )
        status = a.network_status()
        assert status["transport_priority"][0] == "bitchat"
        assert status["bitchat"]["links"] == (ids[1].hex(),) and status["bitchat"]["peer_id"] == ids[0].hex()
        assert ids[2].hex() in status["bitchat"]["peers"], status["bitchat"]
        assert asyncio.run(a.aio.network_status())["bitchat"]["links"] == status["bitchat"]["links"]
    finally:
        for node in reversed(nodes):
            node.stop()
