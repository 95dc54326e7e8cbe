"""Identify, ping and Kademlia codecs: round trips, limits, random bytes; XOR distance and the k-buckets."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from villagemesh.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from villagemesh.protocols import strategies as vst
from villagemesh.protocols.libp2p.identify import MAX_IDENTIFY, MAX_ITEMS, Identify, check_pong
from villagemesh.protocols.libp2p.kad import (
    MAX_PEERS,
    K,
    KadMessage,
    KadPeer,
    MessageType,
    RoutingTable,
    distance,
)
from villagemesh.protocols.libp2p.peerid import ED25519_KEY_PROTO_PREFIX, Multiaddr, PeerId
from villagemesh.protocols.libp2p.protobuf import encode_bytes_field, encode_varint_field

KEY = ED25519_KEY_PROTO_PREFIX + bytes(range(32))
identifies = st.builds(
    Identify,
    st.just(KEY),
    st.lists(vst.libp2p_multiaddrs(), max_size=4).map(tuple),
    st.lists(st.sampled_from(["/ipfs/ping/1.0.0", "/ipfs/id/1.0.0", "/villagemesh/envelope/1.0.0"]), max_size=3).map(
        tuple
    ),
    st.none() | vst.libp2p_multiaddrs(),
    st.text(max_size=20),
    st.text(max_size=20),
)


@given(identifies)
def test_identify_round_trips(message: Identify) -> None:
    assert Identify.decode(message.encode()) == message
    assert message.peer_id == PeerId.from_public_key_proto(KEY)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "exactly one publicKey"),
        (encode_bytes_field(1, KEY) * 2, "exactly one publicKey"),
        (encode_varint_field(1, 3), "field 1 must be bytes"),
        (encode_bytes_field(1, KEY) + encode_bytes_field(5, b"\xff"), "not UTF-8"),
        (encode_bytes_field(1, KEY) + encode_bytes_field(4, b"") * 2, "two observedAddr"),
        (encode_bytes_field(1, KEY) + encode_bytes_field(3, b"/p") * (MAX_ITEMS + 1), "more than"),
        (b"\x00" * (MAX_IDENTIFY + 1), "more than"),
    ],
)
def test_a_malformed_identify_is_refused_naming_it(data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        Identify.decode(data)


def test_identify_limits_hold_on_our_side_too() -> None:
    with pytest.raises(LocalProtocolError, match="at most"):
        Identify(KEY, protocols=("/p",) * (MAX_ITEMS + 1))
    with pytest.raises(LocalProtocolError, match="more than"):
        Identify(KEY, agent_version="x" * MAX_IDENTIFY).encode()
    last = Identify.decode(encode_bytes_field(1, KEY) + encode_bytes_field(6, b"a") + encode_bytes_field(6, b"b"))
    assert last.agent_version == "b"


def test_a_pong_must_echo_the_ping() -> None:
    ping = os.urandom(32)
    check_pong(ping, ping)
    with pytest.raises(RemoteProtocolError, match="answered"):
        check_pong(ping, bytes(32))


peers = st.builds(
    KadPeer, vst.libp2p_peer_ids(), st.lists(vst.libp2p_multiaddrs(), max_size=3).map(tuple), st.integers(0, 3)
)


@given(st.sampled_from(MessageType), st.binary(max_size=64), st.lists(peers, max_size=5), st.lists(peers, max_size=3))
def test_a_kad_message_round_trips(
    kind: MessageType, key: bytes, closer: list[KadPeer], providers: list[KadPeer]
) -> None:
    message = KadMessage(kind, key, tuple(closer), tuple(providers))
    assert KadMessage.decode(message.encode()) == message


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "message type None"),
        (encode_varint_field(1, 9), "message type 9"),
        (encode_varint_field(1, 4) + encode_varint_field(2, 1), "field 2 must be bytes"),
        (encode_varint_field(1, 4) + encode_bytes_field(2, bytes(300)), "key above"),
        (encode_varint_field(1, 4) + encode_bytes_field(8, b""), "one id"),
        (
            encode_varint_field(1, 4)
            + encode_bytes_field(8, encode_bytes_field(1, b"\x00\x00") + encode_bytes_field(3, b"x")),
            "connection type",
        ),
    ],
)
def test_a_malformed_kad_message_is_refused_naming_it(data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        KadMessage.decode(data)


def test_kad_limits_hold_on_our_side_too() -> None:
    one = KadPeer(PeerId.from_ed25519(bytes(32)))
    with pytest.raises(LocalProtocolError, match="at most"):
        KadMessage(MessageType.FIND_NODE, closer_peers=(one,) * (MAX_PEERS + 1))


@given(st.binary(max_size=120))
def test_random_bytes_only_ever_raise_a_protocol_error(data: bytes) -> None:
    for decode in (Identify.decode, KadMessage.decode, KadPeer.decode):
        try:
            decode(data)
        except ProtocolError:
            pass


def test_distance_is_a_metric_of_xor() -> None:
    a, b, c = b"a", b"b", b"c"
    assert distance(a, a) == 0 and distance(a, b) == distance(b, a) > 0
    assert distance(a, c) ^ distance(c, b) == distance(a, b)


def peer(n: int) -> KadPeer:
    return KadPeer(PeerId.from_ed25519(n.to_bytes(32, "big")), (Multiaddr.parse(f"/ip4/10.0.0.1/tcp/{n}"),))


def test_the_routing_table_keeps_k_per_bucket_asks_to_ping_the_oldest_and_finds_the_closest() -> None:
    own = peer(0).peer_id
    table = RoutingTable(own, k=2)
    assert table.seen(KadPeer(own)) is None and len(table) == 0
    asked: list[Any] = []
    for n in range(1, 200):
        oldest = table.seen(peer(n))
        if oldest is not None:
            asked.append((oldest, peer(n)))
    assert asked, "some bucket filled up"
    oldest, newcomer = asked[-1]
    assert table.evict(oldest.peer_id) and not table.evict(oldest.peer_id)
    assert table.seen(newcomer) is None
    assert table.seen(newcomer) is None  # seen again: it just moves to the end
    everyone = [peer(n) for n in range(1, 200)]
    known = {p.peer_id for b in table._buckets.values() for p in b.values()}
    target = b"some key"
    closest = table.closest(target, 3)
    assert (
        closest
        == sorted((p for p in everyone if p.peer_id in known), key=lambda p: distance(target, p.peer_id.multihash))[:3]
    )
    assert len(RoutingTable(own).closest(target)) == 0 and K == 20
