"""The libp2p actor behind the acceptor actor on a real bus: the transport contract, limits, misbehaving peers."""

from __future__ import annotations

import queue
from typing import Any

import pytest

from tests.actors.acceptor.support import Sink, start
from tests.actors.transport_contract import Endpoint, TransportContract
from villagemesh.actors.acceptor.actor import AcceptorActor, acceptor_status
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.libp2p.actor import Libp2pActor, libp2p_status
from villagemesh.actors.libp2p.state import Libp2pLimits, listen_multiaddr
from villagemesh.protocols.libp2p.peerid import PeerId


def endpoint(runtime: Any, suffix: str, keys: NodeKeys, **config: Any) -> tuple[queue.Queue[Any], str]:
    """A sink, a libp2p actor with ``keys`` and an acceptor routing libp2p to it; their queue and multiaddr."""
    inbox: queue.Queue[Any] = queue.Queue()
    start(runtime, Sink, f"sink{suffix}", queue=inbox)
    start(runtime, AcceptorActor, f"acceptor{suffix}", routes={"libp2p": f"libp2p{suffix}"})
    port = acceptor_status(runtime.bus.client(), f"acceptor{suffix}").port
    listen = listen_multiaddr("127.0.0.1", port)
    start(runtime, Libp2pActor, f"libp2p{suffix}", deliver_to=f"sink{suffix}", keys=keys, listen=listen, **config)
    return inbox, f"{listen}/p2p/{PeerId.from_ed25519(keys.identity)}"


class TestLibp2pKeepsTheTransportContract(TransportContract):
    """The shared contract suite (tests/actors/transport_contract.py) on the libp2p transport."""

    NAME = "libp2p"
    UNREACHABLE = f"/ip4/127.0.0.1/tcp/9/p2p/{PeerId.from_ed25519(bytes(32))}"

    @pytest.fixture
    def transport_factory(self) -> Any:
        def make(runtime: Any, suffix: str, keys: NodeKeys) -> Endpoint:
            inbox, address = endpoint(runtime, suffix, keys, limits=Libp2pLimits(connect_timeout_s=2.0))
            return Endpoint(f"libp2p{suffix}", f"sink{suffix}", inbox, address, keys)

        return make


def test_the_status_names_our_peer_id_and_address(runtime: Any) -> None:
    keys = NodeKeys.generate()
    _, address = endpoint(runtime, "", keys)
    status = libp2p_status(runtime.bus.client())
    assert status.peer_id == str(PeerId.from_ed25519(keys.identity)) and status.address == address
