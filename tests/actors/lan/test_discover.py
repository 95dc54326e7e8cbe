"""The LAN actor as a discovery source: one round probes every bootstrap address at once."""

from __future__ import annotations

import queue
import socket
from typing import Any

from nacl.signing import SigningKey

from tests.actors.acceptor.support import CAPS, WAIT, Sink, start
from villagemesh.actors.acceptor.actor import AcceptorActor, acceptor_status
from villagemesh.actors.core.transport import Discover, Discovered
from villagemesh.actors.lan.actor import ROUND_BOOTSTRAP_MAX, LanActor
from villagemesh.actors.lan.identity import Identity
from villagemesh.protocols.discovery import decode_discovery


def identity(port: int) -> Identity:
    return Identity(SigningKey.generate(), (f"ws://127.0.0.1:{port}",), CAPS, port)


def test_a_round_reports_the_live_peer_and_an_error_per_dead_or_silent_address(runtime: Any) -> None:
    """A peer answering discovery is sighted; a refused and a silent address each give one error; none blocks."""
    peer = identity(0)
    start(runtime, LanActor, "peer_lan", identity=peer, beacons=False)
    start(runtime, AcceptorActor, "acceptor", routes={"discovery": "peer_lan"})
    port = acceptor_status(runtime.bus.client()).port
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts, never answers
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    bootstrap = (f"127.0.0.1:{port}", f"127.0.0.1:{closed_port}", f"127.0.0.1:{silent.getsockname()[1]}")
    inbox: queue.Queue[Any] = queue.Queue()
    start(runtime, Sink, "sweeper", queue=inbox)
    start(runtime, LanActor, "lan", identity=identity(1), beacons=False, bootstrap=bootstrap)
    runtime.bus.client().tell("lan", Discover(7, 0.5, "sweeper"))
    found = inbox.get(timeout=WAIT)
    silent.close()
    assert isinstance(found, Discovered) and found.round == 7 and found.transport == "lan"
    assert [decode_discovery(s.announce.encode()).node_id for s in found.sightings] == [peer.node_id]
    assert found.sightings[0].latency_ms is not None and found.sightings[0].latency_ms >= 0
    assert len(found.errors) == 2
    assert any(str(closed_port) in e and "ConnectError" in e for e in found.errors)


def test_a_long_seed_list_is_worked_through_over_rounds_least_recently_tried_first(runtime: Any) -> None:
    """Ten unreachable seeds: a round tries ROUND_BOOTSTRAP_MAX of them, the next starts with the rest."""
    closed = []
    for _ in range(10):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        closed.append(s.getsockname()[1])
        s.close()
    inbox: queue.Queue[Any] = queue.Queue()
    start(runtime, Sink, "sweeper", queue=inbox)
    bootstrap = tuple(f"127.0.0.1:{port}" for port in closed)
    start(runtime, LanActor, "lan", identity=identity(1), beacons=False, bootstrap=bootstrap)
    tried = []
    for round_ in (1, 2):
        runtime.bus.client().tell("lan", Discover(round_, 0.5, "sweeper"))
        found = inbox.get(timeout=WAIT)
        tried.append({port for port in closed if any(f":{port}:" in e for e in found.errors)})
    assert len(tried[0]) == ROUND_BOOTSTRAP_MAX == len(tried[1])
    assert set(closed) - tried[0] <= tried[1]  # the ones left out first come first next time
