"""The libp2p actor's pure parts: addresses, the node id of a peer id, limits."""

from __future__ import annotations

import pytest

from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.libp2p.host import Libp2pHost
from villagemesh.actors.libp2p.kad import PROVIDER_KEY, Kademlia
from villagemesh.actors.libp2p.state import (
    MAX_PROVIDER_KEYS,
    MAX_PROVIDERS_PER_KEY,
    PROVIDER_TTL_S,
    DialBackoff,
    Libp2pLimits,
    ProviderStore,
    Target,
    listen_multiaddr,
    node_id_of,
    target_of,
)
from villagemesh.errors import ConfigError, ConnectError, RemoteProtocolError
from villagemesh.protocols.libp2p.kad import KadMessage, KadPeer, MessageType
from villagemesh.protocols.libp2p.peerid import Multiaddr, PeerId

KEYS = NodeKeys.generate()
PEER = PeerId.from_ed25519(KEYS.identity)


def test_a_multiaddr_gives_host_port_and_the_peer_id_to_check() -> None:
    assert target_of(f"/ip4/10.0.0.1/tcp/4001/p2p/{PEER}") == Target("10.0.0.1", 4001, PEER)
    assert target_of(f"/ip6/::1/tcp/7/p2p/{PEER}") == Target("::1", 7, PEER)


@pytest.mark.parametrize(
    ("address", "match"),
    [
        ("/ip4/10.0.0.1/tcp/4001", "needs"),  # no /p2p/: nobody to check the handshake against
        (f"/p2p/{PEER}", "needs"),
        ("ws://10.0.0.1:4001", "not a multiaddr"),
        ("/ip4/10.0.0.1/udp/1", "not a multiaddr"),
    ],
)
def test_an_address_that_cannot_be_dialled_is_a_connect_error_naming_it(address: str, match: str) -> None:
    with pytest.raises(ConnectError, match=match) as caught:
        target_of(address)
    assert repr(address)[:40] in str(caught.value)


def test_the_node_id_of_a_peer_id_is_the_node_id_of_its_key() -> None:
    assert node_id_of(PEER) == KEYS.node_id
    hashed = PeerId(bytes([0x12, 32]) + bytes(32))
    with pytest.raises(RemoteProtocolError, match="no inlined Ed25519 key"):
        node_id_of(hashed)


def test_listen_multiaddrs_are_made_for_ip_addresses_only() -> None:
    assert listen_multiaddr("127.0.0.1", 9) == "/ip4/127.0.0.1/tcp/9"
    assert listen_multiaddr("::1", 9, PEER) == f"/ip6/::1/tcp/9/p2p/{PEER}"
    with pytest.raises(ConfigError, match="'localhost'"):
        listen_multiaddr("localhost", 9)


@pytest.mark.parametrize(
    "change",
    [
        {"handshake_timeout_s": 0},
        {"send_timeout_s": -1.0},
        {"max_pending_dials": 0},
        {"max_frame": True},
        {"window": 1024},
        {"dial_backoff_s": -1},
        {"dial_backoff_max_s": 0.5},
    ],
)
def test_limits_refuse_values_that_cannot_work_naming_them(change: dict[str, object]) -> None:
    [name] = change
    with pytest.raises(ConfigError, match=name):
        Libp2pLimits(**change)  # type: ignore[arg-type]


def test_provider_records_expire_and_stay_bounded() -> None:
    store = ProviderStore()
    peers = [KadPeer(PeerId.from_ed25519(NodeKeys.generate().identity)) for _ in range(MAX_PROVIDERS_PER_KEY + 1)]
    for n, peer in enumerate(peers):
        store.add(b"k", peer, now=float(n))
    assert store.get(b"k", now=10.0) == peers[1:]  # the oldest went past the bound
    store.add(b"k", peers[1], now=PROVIDER_TTL_S)  # renewed: it outlives the others
    assert store.get(b"k", now=PROVIDER_TTL_S + 100.0) == [peers[1]]
    assert store.get(b"k", now=3 * PROVIDER_TTL_S) == [] and store.get(b"other", now=0.0) == []
    for n in range(MAX_PROVIDER_KEYS + 1):
        store.add(n.to_bytes(4, "big"), peers[0], now=0.0)
    assert store.get((0).to_bytes(4, "big"), now=0.0) == []  # the oldest key went
    assert store.get(MAX_PROVIDER_KEYS.to_bytes(4, "big"), now=0.0) == [peers[0]]


def test_kademlia_keeps_only_a_peers_own_provider_record_and_answers_with_the_closest() -> None:
    host = Libp2pHost(KEYS, lambda message, raw, node_id: None, listen="/ip4/127.0.0.1/tcp/1")
    kad = Kademlia(host, clock=lambda: 0.0)
    alice, mallory = (PeerId.from_ed25519(NodeKeys.generate().identity) for _ in range(2))
    address = (Multiaddr.parse("/ip4/10.0.0.1/tcp/4001"),)
    kad.add(f"/ip4/10.0.0.2/tcp/4001/p2p/{mallory}")
    claim = KadMessage(MessageType.ADD_PROVIDER, PROVIDER_KEY, (), (KadPeer(alice, address),))
    assert kad.answer(claim, remote=mallory) is None and kad.providers.get(PROVIDER_KEY, 0.0) == []
    assert kad.answer(claim, remote=alice) is None
    answer = kad.answer(KadMessage(MessageType.GET_PROVIDERS, PROVIDER_KEY), remote=alice)
    assert answer is not None and [p.peer_id for p in answer.provider_peers] == [alice]
    assert [p.peer_id for p in answer.closer_peers] == [mallory]
    found = kad.answer(KadMessage(MessageType.FIND_NODE, b"x"), remote=mallory)  # the asker is left out
    assert found is not None and found.closer_peers == ()
    assert kad.answer(KadMessage(MessageType.PING), remote=alice) == KadMessage(MessageType.PING)


def test_dial_backoff_doubles_per_failure_up_to_its_cap_stays_bounded_and_a_success_ends_it() -> None:
    backoff = DialBackoff(base=1.0, cap=5.0, capacity=3)
    backoff.check("a", 0.0)  # never failed: may dial
    assert [backoff.failed("a", "refused", now) for now in (0.0, 1.0, 3.0, 7.0)] == [1.0, 2.0, 4.0, 5.0]
    expected = r"libp2p a: in dial backoff for 4\.50 s more after 4 failed dial\(s\), the last: refused"
    with pytest.raises(ConnectError, match=expected):
        backoff.check("a", 7.5)
    backoff.check("a", 12.0)  # its time is up: one more dial may go
    backoff.succeeded("a")
    assert backoff.failed("a", "refused", 20.0) == 1.0  # a success started the count again
    for name in "bcd":
        backoff.failed(name, "refused", 20.0)
    assert len(backoff) == 3
    backoff.check("a", 20.0)  # the oldest failure was forgotten first
