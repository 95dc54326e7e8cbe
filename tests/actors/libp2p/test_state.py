"""The libp2p actor's pure parts: addresses, the node id of a peer id, limits."""

from __future__ import annotations

import pytest

from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.libp2p.state import Libp2pLimits, Target, listen_multiaddr, node_id_of, target_of
from villagemesh.errors import ConfigError, ConnectError, RemoteProtocolError
from villagemesh.protocols.libp2p.peerid import PeerId

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
    [{"handshake_timeout_s": 0}, {"send_timeout_s": -1.0}, {"max_pending_dials": 0}, {"max_frame": True}],
)
def test_limits_refuse_values_that_cannot_work_naming_them(change: dict[str, object]) -> None:
    [name] = change
    with pytest.raises(ConfigError, match=name):
        Libp2pLimits(**change)  # type: ignore[arg-type]
