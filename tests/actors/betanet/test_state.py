"""The BetaNet relay's pure decisions: addresses, routes, delays, held packets, SURBs, loops, epochs."""

from __future__ import annotations

import os
import random

import pytest

from villagemesh.actors.betanet.state import (
    MIX_HOPS,
    HeldQueue,
    LoopTracker,
    Mixnode,
    NoRoute,
    PendingSurbs,
    SurbStore,
    accepted_epochs,
    directory_from_routes,
    epoch_of,
    format_address,
    mix_secret,
    parse_address,
    pick_route,
    poisson_gap,
    sender_delays,
)
from villagemesh.actors.registry.messages import PeerRoutes, RoutesList
from villagemesh.errors import ConfigError, ConnectError
from villagemesh.protocols.sphinx import HEADER_BYTES, MAX_DELAY_MS, Surb, SurbKeys

KEY = bytes(range(32))


def node(n: int) -> Mixnode:
    return Mixnode(f"{n:032x}", "127.0.0.1", 7000 + n, KEY)


def test_an_address_round_trips_and_names_host_port_and_key() -> None:
    for host in ("127.0.0.1", "::1", "node.local"):
        parsed = parse_address(format_address(host, 7000, KEY))
        assert (parsed.host, parsed.port, parsed.public_key) == (host, 7000, KEY)


@pytest.mark.parametrize(
    "address",
    [
        "ws://h:1/" + KEY.hex(),
        "betanet://h:1",
        "betanet://h:x/" + KEY.hex(),
        "betanet://:1/" + KEY.hex(),
        "betanet://h:0/" + KEY.hex(),
        "betanet://h:1/abcd",
        7,
    ],
)
def test_a_malformed_address_is_a_config_error_naming_it(address: object) -> None:
    with pytest.raises(ConfigError, match="not a betanet address"):
        parse_address(address)  # type: ignore[arg-type]


def test_the_mix_key_is_derived_from_the_static_key_and_is_not_it() -> None:
    assert mix_secret(KEY) == mix_secret(KEY) != KEY and len(mix_secret(KEY)) == 32
    with pytest.raises(ConfigError, match="32 bytes"):
        mix_secret(b"short")


def test_the_directory_keeps_peers_with_a_wellformed_betanet_address_other_than_this_node() -> None:
    good = format_address("10.0.0.2", 7000, KEY)
    routes = RoutesList(
        (
            PeerRoutes("a" * 32, (("websocket", ("ws://10.0.0.1:7000",)),)),
            PeerRoutes("b" * 32, (("betanet", ("betanet://bad", good)),)),
            PeerRoutes("c" * 32, (("betanet", (format_address("10.0.0.3", 7000, KEY),)),)),
        )
    )
    directory = directory_from_routes(routes, own_id="c" * 32)
    assert list(directory) == ["b" * 32] and directory["b" * 32].host == "10.0.0.2"


def test_a_route_has_three_distinct_mixes_never_the_excluded_and_refuses_when_too_few() -> None:
    mixes = {m.node_id: m for m in map(node, range(6))}
    rng = random.Random(1)
    for _ in range(50):
        route = pick_route(rng, mixes, (node(0).node_id, node(1).node_id))
        assert len({m.node_id for m in route}) == MIX_HOPS and not {node(0).node_id, node(1).node_id} & {
            m.node_id for m in route
        }
    with pytest.raises(NoRoute, match="2 usable mixnode"):
        pick_route(rng, {m.node_id: m for m in map(node, range(2))}, ())
    assert issubclass(NoRoute, ConnectError)


def test_sender_delays_are_exponential_with_the_mean_asked_and_capped() -> None:
    rng = random.Random(7)
    delays = [d for _ in range(4000) for d in sender_delays(rng, 100.0, 3)]
    assert 90 < sum(delays) / len(delays) < 110 and max(delays) <= MAX_DELAY_MS
    assert sender_delays(rng, 0, 3) == [0, 0, 0]
    assert max(sender_delays(rng, 10**9, 3)) <= MAX_DELAY_MS
    gaps = [poisson_gap(rng, 20.0) for _ in range(4000)]
    assert 0.045 < sum(gaps) / len(gaps) < 0.055


def test_held_packets_leave_in_due_order_not_arrival_order_and_the_queue_is_bounded() -> None:
    held = HeldQueue(capacity=3)
    assert held.next_due() is None
    assert held.push(5.0, "n1", b"late") and held.push(1.0, "n2", b"early") and held.push(3.0, "n3", b"mid")
    assert not held.push(0.5, "n4", b"over") and held.dropped == 1 and len(held) == 3
    assert held.next_due() == 1.0
    assert held.pop_due(3.0) == [("n2", b"early"), ("n3", b"mid")]
    assert held.pop_due(4.9) == [] and held.pop_due(5.0) == [("n1", b"late")]
    with pytest.raises(ConfigError, match="capacity 0"):
        HeldQueue(0)


def surb() -> Surb:
    return Surb(os.urandom(16), os.urandom(HEADER_BYTES), os.urandom(128))


def test_an_answer_takes_its_messages_own_surbs_else_the_newest_each_once_and_bounded() -> None:
    store = SurbStore(per_peer=2, peers=2)
    a1, a2, a3, a4 = surb(), surb(), surb(), surb()
    store.add("a", b"0" * 16, (a1,))
    store.add("a", b"1" * 16, (a2, a3))
    store.add("a", b"2" * 16, (a4,))
    store.add("a", b"3" * 16, ())
    assert store.count("a") == 3  # message 0's SURB was the oldest: gone; a message without SURBs adds none
    assert store.take("a", b"1" * 16) is a3 and store.take("a", b"1" * 16) is a2
    assert store.take("a", b"1" * 16) is a4  # message 1's are used up: the newest of the peer's
    assert store.take("a") is None
    for peer in "bcd":
        store.add(peer, b"m" * 16, (surb(),))
    assert store.count("b") == 0 and store.count("d") == 1


def test_pending_surb_keys_are_taken_once_and_the_oldest_forgotten() -> None:
    pending = PendingSurbs(capacity=2)
    keys = [SurbKeys(bytes([n]) * 16, bytes(128), ()) for n in range(3)]
    for k in keys:
        pending.add(k)
    assert len(pending) == 2 and pending.take(keys[0].surb_id) is None
    assert pending.take(keys[2].surb_id) is keys[2] and pending.take(keys[2].surb_id) is None


def test_loops_come_back_or_count_as_lost() -> None:
    loops = LoopTracker(timeout=10.0, capacity=2)
    loops.sent(b"1" * 16, 0.0)
    loops.sent(b"2" * 16, 5.0)
    assert loops.back(b"1" * 16) and not loops.back(b"1" * 16) and loops.returned == 1
    assert loops.expire(14.0) == 0 and loops.expire(15.1) == 1 and loops.lost == 1
    for n in range(3):
        loops.sent(bytes([n]) * 16, 20.0)
    assert loops.lost == 2  # one forgotten past the capacity counts as lost


def test_epochs_are_whole_periods_and_a_mix_accepts_the_one_before() -> None:
    assert epoch_of(7199.9, 3600) == 1 and epoch_of(7200.0, 3600) == 2
    assert accepted_epochs(5) == (4, 5)
