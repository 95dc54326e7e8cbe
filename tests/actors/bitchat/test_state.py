"""actors.bitchat.state: one node's relay rules, then many nodes on the in-memory radio (multi-hop, churn, storms)."""

from __future__ import annotations

import dataclasses
import random

import pytest
from nacl.signing import SigningKey

from tests.actors.transport_contract import envelope
from villagemesh.actors.bitchat.driver import MeshDriver, make_announce
from villagemesh.actors.bitchat.radio import Frame, LinkDown, LinkUp, MemoryAir
from villagemesh.actors.bitchat.sim import FLOODING, SimMesh, connected, diameter, random_geometric
from villagemesh.actors.bitchat.state import Deliver, MeshConfig, MeshState, Send, dedup_key
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.errors import ConfigError, ConnectError
from villagemesh.protocols.bitchat import BROADCAST, MessageType, Packet, encode, frame, sign
from villagemesh.protocols.bitchat.carriage import wrap

ME, A, B, C, D, E, F, G = (bytes([i]) * 8 for i in range(8))


def _state(*links: bytes, seed: int = 1, **config) -> MeshState:
    state = MeshState(ME, random.Random(seed), MeshConfig(**config))
    for link in links:
        state.link_up(link, 0.0)
    return state


def _packet(
    sender: bytes = A, ttl: int = 7, recipient: bytes | None = None, payload: bytes = b"hi", **fields
) -> Packet:
    return Packet(
        type=fields.pop("type", MessageType.MESSAGE),
        sender_id=sender,
        timestamp=fields.pop("timestamp", 1),
        payload=payload,
        ttl=ttl,
        recipient_id=recipient,
        **fields,
    )


def _sends(actions) -> list[Send]:
    return [a for a in actions if isinstance(a, Send)]


# ---------------------------------------------------------------------------- one node


def test_a_new_broadcast_is_delivered_once_and_relayed_after_a_seeded_jitter() -> None:
    state = _state(A, B)
    actions = state.receive(_packet(), A, 0.0)
    assert actions == [Deliver(_packet(), A)]
    due = state.next_deadline()
    assert due is not None and 0.010 <= due <= 0.040  # two links: BitChat's 10-40 ms
    assert state.tick(due - 1e-6) == []
    (send,) = _sends(state.tick(due))
    assert send.links == (B,) and send.packet.ttl == 6  # split horizon, TTL - 1
    assert state.receive(_packet(), B, 1.0) == [] and state.counters.duplicates == 1
    assert _state(A, B).receive(_packet(), A, 0.0) and _state(A, B).next_deadline() is None
    twin = _state(A, B)
    twin.receive(_packet(), A, 0.0)
    assert twin.next_deadline() == due  # the same seed, the same jitter


def test_jitter_grows_with_degree() -> None:
    few, many = _state(A, B, C), _state(A, B, C, D, E, F, G, *(bytes([0x40 + i]) * 8 for i in range(5)))
    few.receive(_packet(), A, 0.0)
    many.receive(_packet(), A, 0.0)
    assert 0.060 <= (few.next_deadline() or 0) <= 0.150 and 0.100 <= (many.next_deadline() or 0) <= 0.220


@pytest.mark.parametrize(
    "links, kind, expected",
    [
        ((A, B), MessageType.MESSAGE, 6),  # sparse: the full TTL - 1
        ((A, B, C), MessageType.MESSAGE, 6),  # middle: capped at 6
        ((A, B, C, D, E, F), MessageType.MESSAGE, 5),  # dense: capped at 5
    ],
)
def test_relayed_ttls_are_capped_in_dense_neighbourhoods(links, kind, expected) -> None:
    state = _state(*links, prune=False)
    state.receive(_packet(ttl=7, type=kind), A, 0.0)
    (send,) = _sends(state.tick(1.0))
    assert send.packet.ttl == expected


def test_middle_caps_allow_one_more_hop_for_announces_and_dense_caps_keep_two() -> None:
    state = _state(A, B, C, prune=False, middle_ttl=3)
    state.receive(_packet(ttl=9), A, 0.0)
    state.receive(_packet(ttl=9, type=MessageType.ANNOUNCE), A, 0.0)
    assert sorted(s.packet.ttl for s in _sends(state.tick(1.0))) == [3, 4]
    dense = _state(A, B, C, D, E, F, prune=False, dense_ttl=1)
    dense.receive(_packet(ttl=7), A, 0.0)
    assert [s.packet.ttl for s in _sends(dense.tick(1.0))] == [2]


@pytest.mark.parametrize(
    "packet",
    [
        _packet(recipient=ME),  # for us: delivered, not relayed
        _packet(ttl=1),  # no hops left
        _packet(sender=ME),  # our own, echoed back
        _packet(type=MessageType.REQUEST_SYNC),  # link-local
    ],
)
def test_packets_that_must_not_travel_on_are_not_relayed(packet: Packet) -> None:
    state = _state(A, B)
    state.receive(packet, A, 0.0)
    assert state.next_deadline() is None and _sends(state.tick(10.0)) == []


def test_a_packet_for_someone_else_is_relayed_but_not_delivered() -> None:
    state = _state(A, B, C)
    assert state.receive(_packet(recipient=G), A, 0.0) == []
    assert state.next_deadline() is not None


def test_a_relay_is_cancelled_once_every_neighbour_heard_a_copy() -> None:
    state = _state(A, B, C)
    state.learn_neighbours(B, [C])
    state.receive(_packet(), A, 0.0)
    assert state.pending_relays == 1
    state.receive(_packet(), B, 0.01)  # B and its neighbour C have it: nobody left to tell
    assert state.pending_relays == 0 and state.counters.relays_cancelled == 1
    assert _sends(state.tick(1.0)) == []


def test_a_relay_that_goes_out_skips_neighbours_known_to_have_the_packet() -> None:
    state = _state(A, B, C, D)
    state.learn_neighbours(A, [B])
    state.receive(_packet(), A, 0.0)
    (send,) = _sends(state.tick(1.0))
    assert send.links == (C, D)


def test_a_leaf_never_schedules_a_relay() -> None:
    state = _state(A)
    state.receive(_packet(), A, 0.0)
    assert state.counters.relays_scheduled == 1 and state.pending_relays == 0


def test_bitchats_duplicate_count_rule_cancels_too_when_asked() -> None:
    state = _state(A, B, C, D, cancel_after=2)
    state.receive(_packet(), A, 0.0)
    state.receive(_packet(), B, 0.0)
    assert state.pending_relays == 1
    state.receive(_packet(), B, 0.0)
    assert state.pending_relays == 0


def test_a_directed_relay_is_cancelled_when_its_recipient_was_heard_with_it() -> None:
    state = _state(A, B, C, D)
    state.receive(_packet(recipient=G), A, 0.0)
    state.learn_neighbours(B, [G])
    state.receive(_packet(recipient=G), B, 0.0)
    assert state.pending_relays == 0


def test_a_packet_for_a_neighbour_goes_on_its_link_only() -> None:
    state = _state(A, B, C)
    state.receive(_packet(recipient=C), A, 0.0)
    (send,) = _sends(state.tick(1.0))
    assert send.links == (C,)
    (own,) = _sends(state.originate(_packet(sender=ME, recipient=B), 0.0))
    assert own.links == (B,)
    assert _sends(state.originate(_packet(sender=ME, recipient=BROADCAST, timestamp=5), 0.0))[0].links == (A, B, C)


def test_the_seen_set_is_bounded_and_forgets_old_keys() -> None:
    state = _state(A, B, seen_capacity=3, seen_max_age=10.0, announce_max_age=8.0, announce_max_ahead=2.0)
    for t in range(5):
        state.receive(_packet(timestamp=t), A, float(t))
    assert state.receive(_packet(timestamp=0), A, 5.0)  # evicted by capacity: new again
    state.tick(100.0)
    assert state.receive(_packet(timestamp=4), A, 100.0)  # forgotten by age


def test_packets_for_absent_peers_are_kept_and_handed_over_when_they_come_in_range() -> None:
    state = _state(A, B)
    state.receive(_packet(recipient=G, timestamp=1), A, 0.0)
    state.originate(_packet(sender=ME, recipient=G, timestamp=2), 0.0)
    assert state.stored == 1  # ours; the relayed one is kept when its relay goes out
    state.tick(1.0)
    assert state.stored == 2
    handed = state.link_up(G, 2.0)
    assert [s.links for s in _sends(handed)] == [(G,), (G,)] and state.stored == 0
    assert state.counters.forwarded_from_store == 2


def test_the_store_is_bounded_per_peer_and_in_all_and_by_age() -> None:
    state = _state(A, store_per_peer=2, store_capacity=3, store_max_age=50.0)
    for t in range(3):
        state.originate(_packet(sender=ME, recipient=F, timestamp=t), 0.0)
    assert state.stored == 2
    state.originate(_packet(sender=ME, recipient=G, timestamp=10), 1.0)
    state.originate(_packet(sender=ME, recipient=G, timestamp=11), 1.0)
    assert state.stored == 3
    state.tick(50.5)  # F's (kept at 0.0) are stale now, G's (1.0) not quite
    assert state.stored == 2
    assert _sends(state.link_up(G, 60.0)) == []  # stale by the time G shows up


def test_link_down_removes_the_link() -> None:
    state = _state(A, B)
    state.link_down(B)
    assert state.links == {A}


@pytest.mark.parametrize(
    "fields",
    [
        {"seen_capacity": 0},
        {"dense_ttl": "5"},
        {"cancel_after": 0},
        {"seen_max_age": 0},
        {"store_max_age": -1.0},
        {"announce_max_ahead": 0},
        {"seen_max_age": 200.0},  # the default announce window (240 + 60 s) would outlive the seen-set
    ],
)
def test_invalid_config_is_refused(fields) -> None:
    with pytest.raises(ConfigError):
        MeshConfig(**fields)


def test_the_dedup_key_is_bitchats() -> None:
    key = dedup_key(_packet())
    assert key[:8] == A and key[8:16] == (1).to_bytes(8, "big") and key[16] == 2 and len(key) == 21


# ---------------------------------------------------------------------------- the driver and the air


def _driver(air: MemoryAir, me: bytes, inbox: list) -> MeshDriver:
    driver = MeshDriver(me, air.radio(me), random.Random(0), on_deliver=lambda p, link: inbox.append((p, link)))
    driver.radio.start(lambda event: driver.handle(event, air.now))
    return driver


def test_the_driver_refuses_garbage_bad_announces_and_bad_fragments_by_reason() -> None:
    air = MemoryAir()
    inbox: list = []
    driver = _driver(air, ME, inbox)
    driver.handle(Frame(A, b"\x07garbage"), 0.0)
    key = SigningKey(b"\x01" * 32)
    good = make_announce(key, b"\x02" * 32, "a", [B], 3)
    forged = dataclasses.replace(make_announce(key, b"\x02" * 32, "a", [B], 1), signature=bytes(64))
    driver.handle(Frame(A, encode(forged)), 0.0)
    lying = make_announce(key, b"\x02" * 32, "a", [], 2)
    driver.handle(Frame(A, encode(dataclasses.replace(lying, sender_id=G))), 0.0)  # signed, but not G's key
    bad_fragment = _packet(type=MessageType.FRAGMENT, payload=b"short")
    driver.handle(Frame(A, encode(bad_fragment)), 0.0)
    assert driver.refused == {"frame": 1, "announce": 2, "fragment": 1} and inbox == []
    driver.handle(Frame(A, encode(good)), 0.0)
    assert driver.keys == {good.sender_id: bytes(key.verify_key)} and driver.state._neighbours[good.sender_id] == {B}


KEY = SigningKey(b"\x01" * 32)


def _screening() -> tuple[MeshDriver, list, list]:
    """A driver, what it delivers and what it refused before the seen-set (reason, sender, link)."""
    inbox: list = []
    refusals: list = []
    driver = _driver(MemoryAir(), ME, inbox)
    driver.on_refused = lambda reason, packet, link: refusals.append((reason, packet.sender_id, link))
    return driver, inbox, refusals


def test_a_forged_copy_heard_first_does_not_get_the_genuine_announce_dropped_as_its_duplicate() -> None:
    driver, _, refusals = _screening()
    key = KEY
    genuine = make_announce(key, b"\x02" * 32, "a", [B], 3)
    forged = dataclasses.replace(genuine, signature=bytes(64))  # same duplicate key: the signature is not in it
    assert dedup_key(forged) == dedup_key(genuine)
    driver.handle(Frame(A, encode(forged)), 0.0)
    assert driver.refused == {"announce": 1} and refusals == [("announce", genuine.sender_id, A)]
    assert driver.state.counters.received == 0  # never reached the seen-set
    driver.handle(Frame(B, encode(genuine)), 0.0)
    assert driver.keys == {genuine.sender_id: bytes(key.verify_key)}
    assert driver.state.counters.received == 1 and driver.state.counters.duplicates == 0


def test_forged_copies_of_signed_packets_are_refused_before_the_seen_set() -> None:
    driver, inbox, refusals = _screening()
    key = KEY
    announce = make_announce(key, b"\x02" * 32, "a", [], 3)
    driver.handle(Frame(A, encode(announce)), 0.0)  # now we know the key of announce.sender_id
    known = announce.sender_id
    message = sign(_packet(sender=known, payload=b"signed by a known key"), key)
    unknown = sign(_packet(sender=C, payload=b"signed by a key nobody announced"), SigningKey(b"\x03" * 32))
    keys = NodeKeys.generate()
    carried = wrap(envelope(keys, b"x"), keys.signing_key, C, 4)
    for genuine in (message, carried):
        forged = dataclasses.replace(genuine, signature=bytes(64))
        driver.handle(Frame(A, encode(forged)), 0.0)
        driver.handle(Frame(B, encode(genuine)), 0.0)
        assert inbox[-1] == (genuine, B)  # the genuine one, after the forgery, is new
    unsigned = dataclasses.replace(carried, signature=None, timestamp=5)  # a 0x56 packet must be signed
    driver.handle(Frame(A, encode(unsigned)), 0.0)
    driver.handle(Frame(A, encode(dataclasses.replace(unknown, signature=bytes(64)))), 0.0)  # no key: not checked
    assert driver.refused == {"signature": 3}
    assert [reason for reason, _, _ in refusals] == ["signature"] * 3
    assert inbox[-1][0].sender_id == C and inbox[-1][0].payload == unknown.payload


def test_announces_outside_the_timestamp_window_are_refused_as_replays() -> None:
    air = MemoryAir()
    inbox: list = []
    driver = _driver(air, ME, inbox)
    key = SigningKey(b"\x01" * 32)
    wall = 1_800_000_000_000
    config = driver.state.config
    old = make_announce(key, b"\x02" * 32, "a", [], wall - int(config.announce_max_age * 1000) - 1)
    ahead = make_announce(key, b"\x02" * 32, "a", [], wall + int(config.announce_max_ahead * 1000) + 1)
    sighting = _packet(type=MessageType.VILLAGEMESH_ANNOUNCE, timestamp=wall - 3_600_000)  # an hour old
    for packet in (old, ahead, sighting):
        driver.handle(Frame(A, encode(packet)), 0.0, wall)
    assert driver.refused == {"stale": 3} and driver.keys == {} and driver.state.counters.received == 0
    edge = make_announce(key, b"\x02" * 32, "a", [], wall - int(config.announce_max_age * 1000))
    driver.handle(Frame(A, encode(edge)), 0.0, wall)
    assert driver.keys == {edge.sender_id: bytes(key.verify_key)}
    driver.handle(Frame(A, encode(old)), 0.0)  # without a wall clock (the simulation) nothing is windowed
    assert driver.refused == {"stale": 3} and driver.state.counters.received == 2


def test_a_write_to_a_link_that_just_went_is_counted_not_raised() -> None:
    air = MemoryAir()
    me_inbox: list = []
    driver = _driver(air, ME, me_inbox)
    driver.handle(LinkUp(A), 0.0)  # the driver believes in a link the air does not have
    driver.originate(_packet(sender=ME), 0.0)
    assert driver.refused == {"send": 1}
    driver.handle(LinkDown(A), 0.0)
    assert driver.state.links == set()
    with pytest.raises(ConnectError):
        air.transmit(ME, A, b"x")


def test_a_big_packet_crosses_five_hops_as_fragments_and_arrives_whole() -> None:
    mesh = SimMesh(6, [(i, i + 1) for i in range(5)], seed=3, mtu=185)
    payload = random.Random(1).randbytes(1500)
    packet_key = mesh.send(0, payload)
    mesh.run()
    assert mesh.reached(packet_key) == 6
    assert mesh.air.frames > 5 * 8  # 1522 bytes in 143-byte chunks, on each hop
    assert all(node.driver.reassembler.dropped == 0 and len(node.driver.reassembler) == 0 for node in mesh.nodes)


def test_the_air_loses_frames_whose_link_goes_down_in_flight() -> None:
    mesh = SimMesh(2, [(0, 1)], seed=1)
    key = mesh.send(0, b"x")
    mesh.set_link(0, 1, False)
    mesh.run()
    assert mesh.reached(key) == 1 and mesh.air.lost == 1


# ---------------------------------------------------------------------------- many nodes


def _graph(n: int, radius: float, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    while True:
        edges = random_geometric(n, radius, rng)
        if connected(n, edges) and diameter(n, edges) <= 6:
            return edges


def test_fifty_nodes_deliver_every_broadcast_to_everyone_over_many_hops() -> None:
    edges = _graph(50, 0.3, seed=5)
    mesh = SimMesh(50, edges, seed=5)
    mesh.announce_all()
    keys = [mesh.send(source, b"m%d" % source) for source in (0, 17, 42)]
    mesh.run()
    assert [mesh.reached(k) for k in keys] == [50, 50, 50]
    assert diameter(50, edges) >= 3  # really multi-hop
    assert all(node.driver.state.pending_relays == 0 for node in mesh.nodes)


def test_a_relay_storm_stays_bounded_and_cheaper_than_flooding() -> None:
    edges = _graph(50, 0.3, seed=6)
    writes = {}
    for name, config in (("ours", None), ("flooding", FLOODING)):
        mesh = SimMesh(50, edges, seed=6, config=config)
        mesh.announce_all()
        before = mesh.air.frames
        keys = [mesh.send(source, b"storm %d" % source) for source in range(50)]  # everyone at once
        mesh.run()
        assert all(mesh.reached(k) == 50 for k in keys)
        writes[name] = mesh.air.frames - before
        assert all(len(node.driver.state._seen) <= 1000 for node in mesh.nodes)
    flooding_bound = 50 * sum(2 for _ in edges)  # each message crosses each link at most once each way
    assert writes["flooding"] <= flooding_bound and writes["ours"] <= 0.5 * writes["flooding"]


def test_under_link_churn_broadcasts_still_reach_nearly_everyone_and_kept_packets_arrive() -> None:
    edges = _graph(50, 0.3, seed=7)
    mesh = SimMesh(50, edges, seed=7)
    mesh.announce_all()
    rng = random.Random(7)
    keys = []
    down: list[tuple[int, int]] = []
    for step in range(10):
        for a, b in down:
            mesh.set_link(a, b, True)
        down = rng.sample(edges, 10)  # 10 links out of range for this step
        for a, b in down:
            mesh.set_link(a, b, False)
        keys.append(mesh.send(rng.randrange(50), b"churn %d" % step))
        mesh.run(mesh.air.now + 2.0)
    mesh.run()
    reached = [mesh.reached(k) for k in keys]
    assert sum(reached) >= 0.95 * 50 * len(keys), reached
    # a directed message to a node that is cut off arrives when it comes back in range
    lonely = 49
    cut = [(a, b) for a, b in edges if lonely in (a, b)]
    for a, b in cut:
        mesh.set_link(a, b, False)
    mesh.run()
    key = mesh.send(0, b"for you", recipient=lonely)
    mesh.run()
    assert key not in mesh.nodes[lonely].received
    for a, b in cut:
        mesh.set_link(a, b, True)
    mesh.run()
    assert key in mesh.nodes[lonely].received


def test_frames_on_the_memory_air_are_real_bitchat_bytes() -> None:
    air = MemoryAir()
    seen: list = []
    air.radio(A).start(seen.append)
    air.set_link(A, B, True)
    air.set_link(A, B, True)  # already up: nothing new
    air.radio(B).send(A, frame(_packet()))
    air.run()
    assert seen[0] == LinkUp(B) and isinstance(seen[1], Frame) and seen[1].data == encode(_packet())
    air.radio(A).stop()
    air.radio(B).send(A, b"x")
    air.run(air.now + 1.0)
    assert len(seen) == 2 and air.now >= 1.0
    with pytest.raises(ConfigError):
        MemoryAir(latency=0)
