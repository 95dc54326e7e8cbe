"""Peer registry pure core: merging sightings, trust, evolution suitability, priority and selection."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from villagemesh.actors.registry.state import (
    MAX_ADDRESSES_PER_TRANSPORT,
    PeerRecord,
    adjust_trust,
    evolution_priority,
    expired,
    group_addresses,
    is_suitable_for_evolution,
    latency_bonus,
    merge,
    observe,
    record_from_discovery,
    record_outcome,
    suitable_peers,
    transport_of,
)
from villagemesh.errors import ConfigError, RemoteProtocolError
from villagemesh.protocols.discovery import Capabilities

from .strategies import records


def caps(**overrides: object) -> Capabilities:
    base: dict[str, object] = {
        "cpu_cores": 8,
        "ram_mb": 8192,
        "battery_percent": None,
        "network_type": "wifi",
        "device_type": "laptop",
        "performance_tier": "high",
        "evolution_capacity": 0.5,
        "available_for_evolution": True,
        "can_evolve": True,
        "current_evolution_load": 0.0,
        "thermal_state": "normal",
    }
    base.update(overrides)
    return Capabilities(**base)  # type: ignore[arg-type]


def peer(peer_id: str = "p", *, last_seen: float = 100.0, **kwargs: object) -> PeerRecord:
    kwargs.setdefault("addresses", {})
    kwargs.setdefault("capabilities", caps())
    kwargs.setdefault("public_key", None)
    return PeerRecord(peer_id=peer_id, last_seen=last_seen, **kwargs)  # type: ignore[arg-type]


# --- records ------------------------------------------------------------------------------------


def test_addresses_are_normalised_to_a_sorted_hashable_tuple() -> None:
    """A mapping becomes ((transport, addresses), ...) sorted, duplicates and empty transports dropped."""
    rec = peer(addresses={"websocket": ["ws://b:2", "ws://b:2"], "libp2p": ["l:1"], "bitchat": []})
    assert rec.addresses == (("libp2p", ("l:1",)), ("websocket", ("ws://b:2",)))
    assert rec.transports == ("libp2p", "websocket")
    assert rec.addresses_for("websocket") == ("ws://b:2",)
    assert rec.addresses_for("betanet") == ()
    assert hash(rec) == hash(peer(addresses=rec.addresses))


def test_discovery_urls_group_by_their_transport() -> None:
    """ "libp2p://h:1" goes under libp2p; a string without a scheme is refused."""
    grouped = group_addresses(["libp2p://a:1", "websocket://b:2", "libp2p://c:3"])
    assert grouped == (("libp2p", ("libp2p://a:1", "libp2p://c:3")), ("websocket", ("websocket://b:2",)))
    with pytest.raises(ConfigError, match="h:1"):
        group_addresses(["h:1"])


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("peer_id", "", "peer_id"),
        ("trust", 0.05, "trust"),
        ("trust", 1.5, "trust"),
        ("last_seen", float("nan"), "last_seen"),
        ("latency_ms", -1.0, "latency_ms"),
        ("addresses", {"libp2p": "a:1"}, "addresses for 'libp2p'"),
        ("addresses", {"": ["a:1"]}, "transport name"),
        ("public_key", "abc", "public_key"),
        ("source", "", "source"),
    ],
)
def test_invalid_records_are_refused_naming_the_field(field: str, value: object, named: str) -> None:
    """Every bad field is a ConfigError that names it."""
    base = dict(peer_id="p", addresses={}, capabilities=None, public_key=None, last_seen=1.0)
    base[field] = value
    with pytest.raises(ConfigError, match=named):
        PeerRecord(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("address", "transport"),
    [
        ("ws://127.0.0.1:7000", "websocket"),
        ("WSS://h:443", "websocket"),
        ("/ip4/127.0.0.1/tcp/4001", "libp2p"),
        ("libp2p://h:1", "libp2p"),
        ("bitchat://aa:bb", "bitchat"),
        ("tcp://10.0.0.2:9000", "tcp"),
    ],
)
def test_addresses_map_to_their_transport(address: str, transport: str) -> None:
    """URL schemes name transports (ws → websocket); multiaddrs are libp2p; other schemes name themselves."""
    assert transport_of(address) == transport


def test_observation_says_what_changed() -> None:
    """New peer; an identical re-sighting changes nothing; a new address changes the routes."""
    first = observe(None, peer(addresses={"libp2p": ["a:1"]}))
    assert (first.new, first.changed, first.routes_changed) == (True, True, True)
    again = observe(first.record, first.record)
    assert (again.new, again.changed, again.routes_changed) == (False, False, False)
    later = observe(first.record, peer(last_seen=200.0, addresses={"lan": ["x:1"]}))
    assert (later.changed, later.routes_changed) == (True, True)
    touched = observe(later.record, peer(last_seen=300.0, addresses={"lan": ["x:1"]}))
    assert (touched.changed, touched.routes_changed) == (True, False)


def test_discovery_sighting_uses_this_nodes_clock() -> None:
    """last_seen is the observer's now; addresses are grouped by transport."""
    rec = record_from_discovery(
        "n1", ["ws://h:1", "/ip4/1.2.3.4/tcp/1"], caps(), b"k" * 32, now=42.0, latency_ms=3.0, source="lan"
    )
    assert rec.last_seen == 42.0 and rec.transports == ("libp2p", "websocket") and rec.trust == 0.5


# --- merge --------------------------------------------------------------------------------------


def test_newer_sighting_wins_but_unknowns_do_not_erase() -> None:
    """New capabilities and source win; a None latency keeps the measured one; trust stays ours."""
    old = peer(last_seen=10, capabilities=caps(cpu_cores=2), latency_ms=40.0, trust=0.9, source="lan")
    new = peer(last_seen=20, capabilities=caps(cpu_cores=16), latency_ms=None, source="libp2p")
    merged = merge(old, new)
    assert merged.capabilities == caps(cpu_cores=16)
    assert (merged.last_seen, merged.latency_ms, merged.trust, merged.source) == (20, 40.0, 0.9, "libp2p")


def test_older_sighting_arriving_late_does_not_roll_back() -> None:
    """A delayed older sighting keeps the newer capabilities but still adds its addresses."""
    stored = peer(last_seen=20, capabilities=caps(cpu_cores=16), addresses={"libp2p": ["new:1"]})
    late = peer(last_seen=10, capabilities=caps(cpu_cores=2), addresses={"libp2p": ["old:1"], "lan": ["x:1"]})
    merged = merge(stored, late)
    assert merged.capabilities == caps(cpu_cores=16) and merged.last_seen == 20
    assert merged.addresses == (("lan", ("x:1",)), ("libp2p", ("new:1", "old:1")))


def test_a_different_public_key_for_a_known_peer_is_refused() -> None:
    """The first key seen is pinned; another one is a RemoteProtocolError naming the peer."""
    with pytest.raises(RemoteProtocolError, match="peer p presented public key"):
        merge(peer(public_key=b"a" * 32), peer(public_key=b"b" * 32, last_seen=200))
    assert merge(peer(), peer(public_key=b"a" * 32)).public_key == b"a" * 32


def test_records_of_different_peers_do_not_merge() -> None:
    """Merging p with q is a ConfigError naming both."""
    with pytest.raises(ConfigError, match="'p' and 'q'"):
        merge(peer("p"), peer("q"))


def test_addresses_per_transport_are_capped_keeping_the_newest() -> None:
    """Address churn cannot grow a record past MAX_ADDRESSES_PER_TRANSPORT."""
    rec = peer(addresses={"lan": [f"old{i}:1" for i in range(MAX_ADDRESSES_PER_TRANSPORT)]}, last_seen=1)
    rec = merge(rec, peer(addresses={"lan": ["fresh:1"]}, last_seen=2))
    assert len(rec.addresses_for("lan")) == MAX_ADDRESSES_PER_TRANSPORT
    assert rec.addresses_for("lan")[0] == "fresh:1"


@given(records(st.just("p")), records(st.just("p")))
def test_merge_properties(old: PeerRecord, new: PeerRecord) -> None:
    """Trust is the old one's, last_seen the max, every transport of either stays, the newest address leads."""
    if old.public_key is not None and new.public_key is not None and old.public_key != new.public_key:
        return
    merged = merge(old, new)
    assert merged.trust == old.trust
    assert merged.last_seen == max(old.last_seen, new.last_seen)
    assert set(merged.transports) == set(old.transports) | set(new.transports)
    newer = new if new.last_seen >= old.last_seen else old
    for transport, addresses in newer.addresses:
        assert merged.addresses_for(transport)[: len(addresses)] == addresses
    assert merge(merged, merged) == merged  # idempotent


# --- trust --------------------------------------------------------------------------------------


def test_trust_moves_by_the_documented_steps() -> None:
    """+0.05 on success, −0.02 on failure."""
    assert record_outcome(peer(), True).trust == pytest.approx(0.55)
    assert record_outcome(peer(), False).trust == pytest.approx(0.48)


@given(st.floats(0.1, 1.0), st.lists(st.booleans(), max_size=200))
def test_trust_stays_within_bounds(trust: float, outcomes: list[bool]) -> None:
    """Any sequence of outcomes keeps trust within [0.1, 1.0]."""
    for ok in outcomes:
        trust = adjust_trust(trust, ok)
        assert 0.1 <= trust <= 1.0


# --- suitability and priority -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "trust", "suitable"),
    [
        ({}, 0.5, True),
        ({"can_evolve": False}, 0.5, False),
        ({"available_for_evolution": False}, 0.5, False),
        ({"current_evolution_load": 0.8}, 0.5, False),
        ({"current_evolution_load": 0.79}, 0.5, True),
        ({"thermal_state": "throttling"}, 0.5, False),
        ({"thermal_state": "hot"}, 0.5, True),
        ({"battery_percent": 20}, 0.5, False),
        ({"battery_percent": 21}, 0.5, True),
        ({}, 0.3, False),
        ({}, 0.31, True),
    ],
)
def test_suitability_follows_the_seed_rule_and_the_trust_floor(
    overrides: dict[str, object], trust: float, suitable: bool
) -> None:
    """Each clause of the rule on its own decides."""
    assert is_suitable_for_evolution(peer(capabilities=caps(**overrides), trust=trust)) is suitable


def test_peer_without_capabilities_is_unsuitable_and_scores_zero() -> None:
    """No capabilities, no evolution."""
    rec = peer(capabilities=None)
    assert not is_suitable_for_evolution(rec) and evolution_priority(rec) == 0.0


def test_priority_formula_worked_example() -> None:
    """0.4·0.5 + 0.2 + 0.1 − 0.2 (battery 40) − 0.3·0.1 + 0.1·(0.7 − 0.5) + 0.1 (40 ms) = 0.39."""
    rec = peer(capabilities=caps(battery_percent=40, current_evolution_load=0.1), trust=0.7, latency_ms=40.0)
    assert evolution_priority(rec) == pytest.approx(0.39)


def test_latency_term_keeps_the_legacy_bonus_and_fades_without_a_cliff() -> None:
    """0.1 under 100 ms, 0.05 at 150 ms, 0 from 200 ms, 0 when unknown."""
    assert [latency_bonus(x) for x in (0.0, 100.0, 150.0, 200.0, 5000.0, None)] == pytest.approx(
        [0.1, 0.1, 0.05, 0.0, 0.0, 0.0]
    )


@given(records())
def test_priority_is_always_within_unit_interval(rec: PeerRecord) -> None:
    """Clamped to [0, 1] for every valid record."""
    assert 0.0 <= evolution_priority(rec) <= 1.0


# --- selection and expiry -----------------------------------------------------------------------


def test_selection_has_no_cap_and_ranks_by_priority_then_id() -> None:
    """Twelve suitable peers all come back (the old 5-peer cap was a bug), best first."""
    recs = [peer(f"p{i:02d}", capabilities=caps(evolution_capacity=(i % 4) / 4)) for i in range(12)]
    selection = suitable_peers(recs, 3, now=100.0, max_age=60.0)
    assert len(selection.peers) == 12 and selection.enough and selection.missing == 0
    assert selection.peer_ids[:3] == ("p03", "p07", "p11")


def test_too_few_peers_is_an_answer_not_an_error() -> None:
    """min_count 5 with two suitable: both returned, enough is False, missing is 3."""
    recs = [peer("a"), peer("b"), peer("c", capabilities=caps(can_evolve=False))]
    selection = suitable_peers(recs, 5, now=100.0, max_age=60.0)
    assert selection.peer_ids == ("a", "b") and not selection.enough and selection.missing == 3


def test_stale_peers_are_not_selected() -> None:
    """A peer last seen longer ago than max_age is left out."""
    recs = [peer("fresh", last_seen=90.0), peer("stale", last_seen=10.0)]
    assert suitable_peers(recs, 1, now=100.0, max_age=60.0).peer_ids == ("fresh",)


@pytest.mark.parametrize(("min_count", "max_age"), [(-1, 1.0), (True, 1.0), (1, -1.0)])
def test_invalid_selection_arguments_are_refused(min_count: int, max_age: float) -> None:
    """Negative counts or ages are ConfigErrors."""
    with pytest.raises(ConfigError):
        suitable_peers([], min_count, now=0.0, max_age=max_age)


@given(st.lists(records(), max_size=20, unique_by=lambda r: r.peer_id), st.integers(0, 30), st.floats(0, 1e6))
def test_selection_is_every_fresh_suitable_peer_sorted(recs: list[PeerRecord], min_count: int, now: float) -> None:
    """Exactly the fresh suitable peers, priority descending, ties by id; enough iff ≥ min_count."""
    selection = suitable_peers(recs, min_count, now=now, max_age=1000.0)
    wanted = {r.peer_id for r in recs if now - r.last_seen <= 1000.0 and is_suitable_for_evolution(r)}
    assert set(selection.peer_ids) == wanted and len(selection.peers) == len(wanted)
    keys = [(-evolution_priority(r), r.peer_id) for r in selection.peers]
    assert keys == sorted(keys)
    assert selection.enough == (len(wanted) >= min_count)


@given(st.lists(records(), max_size=20, unique_by=lambda r: r.peer_id), st.floats(0, 2e6), st.floats(0, 1e6))
def test_expired_is_exactly_the_peers_older_than_max_age(recs: list[PeerRecord], now: float, age: float) -> None:
    """expired() lists, sorted, every peer with now − last_seen > max_age."""
    assert expired(recs, now, age) == sorted(r.peer_id for r in recs if now - r.last_seen > age)


def test_records_are_frozen() -> None:
    """A record cannot be changed in place."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        peer().trust = 0.9  # type: ignore[misc]
