"""The registry actor on a real bus and a real SQLite file: sightings in, routes out, survives restarts."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from tests.conftest import WAIT
from villagemesh.actors.core.base import Actor, ActorContext, InjectedCrash
from villagemesh.actors.core.transport import Sighting
from villagemesh.actors.lan.messages import PeerAnnounced
from villagemesh.actors.registry.actor import (
    RegistryActor,
    find_suitable_peers,
    get_peer,
    list_peers,
    record_evolution_outcome,
)
from villagemesh.actors.registry.messages import (
    ForgetPeer,
    ListRoutes,
    PeerRoutes,
    PeerSeen,
    RoutesList,
    capabilities_to_text,
)
from villagemesh.actors.registry.store import PeerStore
from villagemesh.actors.sweeper.messages import Sighted
from villagemesh.errors import ConfigError
from villagemesh.protocols.discovery import Capabilities, encode_discovery, sign_announce
from villagemesh.supervision.spec import ChildSpec, SupervisorSpec
from villagemesh.supervision.supervisor import Supervisor

CAPS = Capabilities(
    cpu_cores=8,
    ram_mb=16384,
    battery_percent=None,
    network_type="ethernet",
    device_type="desktop",
    performance_tier="premium",
    evolution_capacity=0.9,
    available_for_evolution=True,
)


class RoutesSink(Actor):
    """Stands in for the retrier: records every PeerRoutes."""

    got: list[PeerRoutes] = []
    cond = threading.Condition()

    def handle(self, msg: Any) -> Any:
        with RoutesSink.cond:
            RoutesSink.got.append(msg)
            RoutesSink.cond.notify_all()
        return None

    @classmethod
    def wait_for(cls, predicate: Any) -> None:
        with cls.cond:
            assert cls.cond.wait_for(lambda: any(predicate(r) for r in cls.got), WAIT), cls.got


def announce(seed: int, *, caps: Capabilities = CAPS, timestamp: float | None = None, port: int = 7000) -> Any:
    return sign_announce(
        SigningKey(bytes([seed]) * 32),
        addresses=(f"ws://127.0.0.1:{port}", "tcp://127.0.0.1:9000"),
        capabilities=caps,
        timestamp=time.time() if timestamp is None else timestamp,
    )


def start(runtime: Any, tmp_path: Path, **config: Any) -> None:
    RoutesSink.got = []
    cfg = {"path": str(tmp_path / "peers.db"), "routes_to": "retrier", **config}
    children = [ChildSpec("retrier", RoutesSink), ChildSpec("registry", RegistryActor, config=cfg)]
    Supervisor.launch(SupervisorSpec("root", children, intensity=10), runtime)


def test_signed_lan_announce_becomes_a_peer_and_its_routes_reach_the_retrier(runtime, recorder, tmp_path):
    """A verified beacon → peer_discovered, the record, and PeerRoutes grouped by transport."""
    start(runtime, tmp_path)
    a = announce(1)
    runtime.bus.client().tell("registry", PeerAnnounced(a.node_id, a.addresses, "127.0.0.1:5000", encode_discovery(a)))
    event = recorder.wait_for("peer_discovered", peer_id=a.node_id)[0]
    assert event["source"] == "lan" and event["transports"] == ["tcp", "websocket"]
    rec = get_peer(runtime.bus.client(), a.node_id, timeout=WAIT)
    assert rec is not None and rec.public_key == a.public_key and rec.capabilities == CAPS
    RoutesSink.wait_for(lambda r: r.peer_id == a.node_id and ("websocket", ("ws://127.0.0.1:7000",)) in r.addresses)


def test_sweeper_sightings_carry_their_transport_and_latency(runtime, recorder, tmp_path):
    """Sighted from the sweeper: source is the transport, latency is kept."""
    start(runtime, tmp_path)
    a = announce(2)
    runtime.bus.client().tell("registry", Sighted((Sighting("websocket", encode_discovery(a).decode(), 4.5),)))
    recorder.wait_for("peer_discovered", peer_id=a.node_id)
    rec = get_peer(runtime.bus.client(), a.node_id, timeout=WAIT)
    assert rec is not None and (rec.source, rec.latency_ms) == ("websocket", 4.5)


def test_a_batch_of_sightings_is_folded_in_order_and_survives_a_restart(runtime, recorder, tmp_path):
    """One Sighted with two peers, one of them twice (a new port) and a forgery between: each peer is
    discovered once, the later sighting leads, the forgery is rejected, all of it is on file."""
    start(runtime, tmp_path)
    a, b = announce(7), announce(8)
    moved = announce(7, port=7001, timestamp=a.timestamp + 1)
    forged = json.loads(encode_discovery(announce(9)))
    forged["addresses"] = ["ws://203.0.113.9:666"]
    batch = [
        encode_discovery(a).decode(),
        json.dumps(forged),
        encode_discovery(b).decode(),
        encode_discovery(moved).decode(),
    ]
    client = runtime.bus.client()
    client.tell("registry", Sighted(tuple(Sighting("lan", body, None) for body in batch)))
    discovered = recorder.wait_for("peer_discovered", count=2)
    assert {e["peer_id"] for e in discovered} == {a.node_id, b.node_id}
    assert "signature" in recorder.wait_for("sighting_rejected")[0]["reason"]
    client.tell("registry", InjectedCrash("test"))
    recorder.wait_for("child_restarted", child_id="registry")
    rec = get_peer(client, a.node_id, timeout=WAIT)
    assert rec is not None and dict(rec.addresses)["websocket"][0] == "ws://127.0.0.1:7001"  # the newest first
    assert len(list_peers(client, timeout=WAIT)) == 2
    assert recorder.matching("peer_updated") == []  # folded before it was written: one discovery, no update


def test_forged_and_stale_announces_are_rejected(runtime, recorder, tmp_path):
    """A tampered body fails verification; a replayed hour-old announce is refused; neither becomes a peer."""
    start(runtime, tmp_path)
    body = json.loads(encode_discovery(announce(3)))
    body["addresses"] = ["ws://203.0.113.9:666"]
    stale = announce(4, timestamp=time.time() - 3600)
    client = runtime.bus.client()
    client.tell("registry", Sighted((Sighting("websocket", json.dumps(body), None),)))
    client.tell("registry", PeerAnnounced(stale.node_id, stale.addresses, "x", encode_discovery(stale)))
    rejected = recorder.wait_for("sighting_rejected", count=2)
    assert "signature" in rejected[0]["reason"] and "off this node's clock" in rejected[1]["reason"]
    assert list_peers(client, timeout=WAIT) == []


def test_a_restarted_registry_loses_nothing(runtime, recorder, tmp_path):
    """Crash the registry: the new instance reloads every peer from the file."""
    start(runtime, tmp_path)
    client = runtime.bus.client()
    for seed in (5, 6):
        a = announce(seed)
        client.tell("registry", PeerAnnounced(a.node_id, a.addresses, "x", encode_discovery(a)))
    recorder.wait_for("peer_discovered", count=2)
    before = list_peers(client, timeout=WAIT)
    client.tell("registry", InjectedCrash("test"))  # the supervisor restarts it
    recorder.wait_for("child_restarted", child_id="registry")
    assert list_peers(client, timeout=WAIT) == before and len(before) == 2


def test_suitable_peers_are_ranked_uncapped_and_trust_moves(runtime, recorder, tmp_path):
    """Seven suitable peers all come back best first; an evolution outcome changes trust and the file."""
    start(runtime, tmp_path)
    client = runtime.bus.client()
    for n in range(8):
        caps = Capabilities(**{**CAPS.to_json(), "transports": (), "evolution_capacity": n / 10, "can_evolve": n > 0})
        client.tell(
            "registry",
            PeerSeen(f"peer{n}", (f"ws://127.0.0.1:{7000 + n}",), capabilities_to_text(caps), None, None, "test"),
        )
    recorder.wait_for("peer_discovered", count=8)
    peers, enough = find_suitable_peers(client, 3, timeout=WAIT)
    assert enough and [p.peer_id for p in peers] == [f"peer{n}" for n in range(7, 0, -1)]
    record_evolution_outcome(client, "peer7", False)
    assert get_peer(client, "peer7", timeout=WAIT).trust == pytest.approx(0.48)  # type: ignore[union-attr]
    peers, enough = find_suitable_peers(client, 10, timeout=WAIT)
    assert not enough and len(peers) == 7
    with PeerStore(tmp_path / "peers.db") as store:  # a second reader sees the committed trust
        assert store.get("peer7").trust == pytest.approx(0.48)  # type: ignore[union-attr]


def test_stale_peers_expire_and_the_retrier_learns_they_are_gone(runtime, recorder, tmp_path):
    """Not seen for max_age: peer_expired, removed from the file, PeerRoutes with no address."""
    start(runtime, tmp_path, max_age=0.2, expire_every=0.05)
    runtime.bus.client().tell("registry", PeerSeen("old", ("ws://127.0.0.1:1",), None, None, None, "test"))
    recorder.wait_for("peer_expired", peer_id="old")
    RoutesSink.wait_for(lambda r: r.peer_id == "old" and r.addresses == ())
    assert get_peer(runtime.bus.client(), "old", timeout=WAIT) is None


def test_forgetting_a_peer_removes_it(runtime, recorder, tmp_path):
    """ForgetPeer drops it from memory and file."""
    start(runtime, tmp_path)
    client = runtime.bus.client()
    client.tell("registry", PeerSeen("p", ("ws://127.0.0.1:1",), None, None, None, "test"))
    recorder.wait_for("peer_discovered", peer_id="p")
    client.tell("registry", ForgetPeer("p"))
    recorder.wait_for("peer_forgotten", peer_id="p")
    assert list_peers(client, timeout=WAIT) == []


def test_routes_are_told_on_request_without_an_ask(runtime, recorder, tmp_path):
    """ListRoutes(reply_to) as a tell: the RoutesList goes to reply_to (how a starting retrier asks)."""
    start(runtime, tmp_path)
    client = runtime.bus.client()
    client.tell("registry", PeerSeen("p", ("ws://127.0.0.1:1", "/ip4/127.0.0.1/tcp/2"), None, None, None, "test"))
    recorder.wait_for("peer_discovered", peer_id="p")
    client.tell("registry", ListRoutes(reply_to="retrier"))
    expected = PeerRoutes("p", (("libp2p", ("/ip4/127.0.0.1/tcp/2",)), ("websocket", ("ws://127.0.0.1:1",))))
    RoutesSink.wait_for(lambda r: isinstance(r, RoutesList) and r.routes == (expected,))


def test_bad_selection_arguments_are_refused_before_reaching_the_registry(runtime, recorder, tmp_path):
    """min_count −1 is a ConfigError in the caller; the registry keeps running."""
    start(runtime, tmp_path)
    with pytest.raises(ConfigError, match="min_count"):
        find_suitable_peers(runtime.bus.client(), -1, timeout=WAIT)
    assert list_peers(runtime.bus.client(), timeout=WAIT) == []


def test_a_full_registry_evicts_the_peer_seen_longest_ago(runtime, recorder, tmp_path):
    """max_peers 2: a third peer evicts the stalest (logged, routes withdrawn, gone from the file too)."""
    start(runtime, tmp_path, max_peers=2)
    client = runtime.bus.client()
    peers = [announce(seed) for seed in (21, 22, 23)]
    for a in peers:
        client.tell("registry", Sighted((Sighting("lan", encode_discovery(a).decode(), None),)))
        recorder.wait_for("peer_discovered", peer_id=a.node_id)
    evicted = recorder.wait_for("peer_evicted")[0]
    assert evicted["peer_id"] == peers[0].node_id
    RoutesSink.wait_for(lambda r: r.peer_id == peers[0].node_id and r.addresses == ())
    assert {p.peer_id for p in list_peers(client, timeout=WAIT)} == {peers[1].node_id, peers[2].node_id}
    client.tell("registry", InjectedCrash("test"))
    recorder.wait_for("child_restarted", child_id="registry")
    assert len(list_peers(client, timeout=WAIT)) == 2


def test_max_peers_must_be_a_positive_int(runtime, tmp_path):
    """Refused when the actor is made, naming the value."""
    runtime.bus.open_mailbox("registry")
    config = {"path": str(tmp_path / "peers.db"), "max_peers": 0}
    with pytest.raises(ConfigError, match="'max_peers' must be an int >= 1, got 0"):
        RegistryActor(ActorContext(runtime.bus, "registry", runtime.log, runtime.scheduler, config=config))
