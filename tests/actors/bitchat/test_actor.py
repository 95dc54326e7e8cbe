"""The BitChat actor on the in-memory radio (live air): the transport contract, multi-hop, sightings, no radio."""

from __future__ import annotations

import itertools
import queue
import time
from typing import Any

import pytest

from tests.actors.acceptor.support import CAPS, WAIT, Sink, start
from tests.actors.transport_contract import Endpoint, TransportContract, envelope, next_of
from villagemesh.actors.bitchat.actor import BitchatActor
from villagemesh.actors.bitchat.messages import BitchatStatus, GetBitchatStatus
from villagemesh.actors.bitchat.radio import MemoryAir
from villagemesh.actors.bitchat.state import format_address
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.core.transport import REPLY_ADDRESS, Discover, Discovered, Received, Transmit, TransmitResult
from villagemesh.protocols.bitchat import peer_id
from villagemesh.protocols.discovery import decode_discovery
from villagemesh.protocols.envelope import decode_message, encode_message


def status(runtime: Any, name: str) -> BitchatStatus:
    answer = runtime.bus.client().ask(name, GetBitchatStatus(), timeout=WAIT)
    assert isinstance(answer, BitchatStatus)
    return answer


def wait_links(runtime: Any, name: str, count: int) -> BitchatStatus:
    """Until the actor has seen ``count`` links up (its LinkUp events come through its own queue)."""
    deadline = time.monotonic() + WAIT
    while (current := status(runtime, name)).links.__len__() < count:
        assert time.monotonic() < deadline, f"{name} has links {current.links}, wanted {count}"
        time.sleep(0.01)
    return current


def node(runtime: Any, air: MemoryAir | Any, suffix: str, keys: NodeKeys, **config: Any) -> Endpoint:
    """A bitchat actor and its sink; ``air`` is a MemoryAir, or a radio factory (peer id -> radio)."""
    inbox: queue.Queue[Any] = queue.Queue()
    start(runtime, Sink, f"sink{suffix}", queue=inbox)
    start(
        runtime,
        BitchatActor,
        f"bitchat{suffix}",
        keys=keys,
        radio=air.radio if isinstance(air, MemoryAir) else air,
        deliver_to=f"sink{suffix}",
        seed=1,
        **config,
    )
    return Endpoint(f"bitchat{suffix}", f"sink{suffix}", inbox, format_address(peer_id(keys.static_public)), keys)


def _me(endpoint: Endpoint) -> bytes:
    return peer_id(endpoint.keys.static_public)


class TestBitchatKeepsTheTransportContract(TransportContract):
    """The shared contract suite on the BitChat transport, every endpoint in range of every other."""

    NAME = "bitchat"
    UNREACHABLE = "bitchat://not-a-peer-id"
    SEES_PEER = False
    WHY = (
        "a mesh floods: at send time it cannot know that nobody holds a peer id, and the recipient"
        " proves who it is only by the signature on what it sends back"
    )

    @pytest.fixture
    def transport_factory(self) -> Any:
        air = MemoryAir(live=True)
        made: list[Endpoint] = []

        def make(runtime: Any, suffix: str, keys: NodeKeys) -> Endpoint:
            endpoint = node(runtime, air, suffix, keys)
            for other in made:
                air.set_link(_me(other), _me(endpoint), True)
            made.append(endpoint)
            for each in made:
                wait_links(runtime, each.actor, len(made) - 1)
            return endpoint

        return make


def test_an_envelope_crosses_a_chain_of_relays_and_the_reply_finds_its_way_back(runtime: Any) -> None:
    air = MemoryAir(live=True)
    ends = [node(runtime, air, f"-{i}", NodeKeys.generate()) for i in range(4)]
    for left, right in itertools.pairwise(ends):
        air.set_link(_me(left), _me(right), True)
    wait_links(runtime, ends[0].actor, 1)
    wait_links(runtime, ends[3].actor, 1)
    first, last = ends[0], ends[3]
    msg = envelope(first.keys, b"three hops")
    runtime.bus.client().tell(
        first.actor, Transmit(msg.id, last.keys.node_id, last.address, encode_message(msg), first.sink)
    )
    assert next_of(first.inbox, TransmitResult).ok
    received = next_of(last.inbox, Received)
    assert received.remote == first.keys.node_id and decode_message(received.envelope) == msg
    back = envelope(last.keys, b"and back")
    runtime.bus.client().tell(
        last.actor, Transmit(back.id, first.keys.node_id, REPLY_ADDRESS, encode_message(back), last.sink)
    )
    assert next_of(last.inbox, TransmitResult).ok
    assert decode_message(next_of(first.inbox, Received).envelope) == back
    assert status(runtime, ends[1].actor).counters["relays_sent"] >= 1


def test_a_reply_to_a_peer_never_heard_from_is_a_retryable_failure(runtime: Any) -> None:
    air = MemoryAir(live=True)
    a = node(runtime, air, "-a", NodeKeys.generate())
    other = NodeKeys.generate()
    msg = envelope(a.keys, b"x")
    runtime.bus.client().tell(a.actor, Transmit(msg.id, other.node_id, REPLY_ADDRESS, encode_message(msg), a.sink))
    result = next_of(a.inbox, TransmitResult)
    assert not result.ok and result.retryable and "no BitChat route back" in (result.error or "")
    runtime.bus.client().tell(
        a.actor, Transmit(msg.id, other.node_id, format_address(b"\x01" * 8), encode_message(msg), a.sink)
    )
    result = next_of(a.inbox, TransmitResult)
    assert not result.ok and result.retryable and "no BitChat neighbour" in (result.error or "")


def test_signed_villagemesh_announces_over_bitchat_become_sightings(runtime: Any) -> None:
    air = MemoryAir(live=True)
    a = node(runtime, air, "-a", NodeKeys.generate(), capabilities=CAPS, announce_s=0.05)
    b = node(runtime, air, "-b", NodeKeys.generate(), capabilities=CAPS, announce_s=0.05)
    air.set_link(_me(a), _me(b), True)
    deadline = time.monotonic() + WAIT
    round_ = 0
    while True:
        round_ += 1
        runtime.bus.client().tell(a.actor, Discover(round_, 1.0, a.sink))
        found = next_of(a.inbox, Discovered)
        if found.sightings:
            break
        assert time.monotonic() < deadline, "no sighting"
        time.sleep(0.05)
    (sighting,) = found.sightings
    announce = decode_discovery(sighting.announce.encode())
    assert announce.node_id == b.keys.node_id and b.address in announce.addresses
    assert status(runtime, a.actor).peers == (_me(b).hex(),)


def test_without_a_radio_the_actor_runs_and_every_transmit_fails_retryably(runtime: Any, recorder: Any) -> None:
    inbox: queue.Queue[Any] = queue.Queue()
    start(runtime, Sink, "sink-x", queue=inbox)
    keys = NodeKeys.generate()
    start(runtime, BitchatActor, "bitchat-x", keys=keys, deliver_to="sink-x")
    recorder.wait_for("bitchat_radio_unavailable")
    msg = envelope(keys, b"x")
    runtime.bus.client().tell(
        "bitchat-x", Transmit(msg.id, keys.node_id, format_address(b"\x02" * 8), encode_message(msg), "sink-x")
    )
    result = next_of(inbox, TransmitResult)
    assert not result.ok and result.retryable and "unavailable" in (result.error or "")
    assert status(runtime, "bitchat-x").radio.startswith("unavailable")


def test_forged_and_stale_packets_are_refused_and_logged_and_the_genuine_one_still_arrives(
    runtime: Any, recorder: Any
) -> None:
    import dataclasses

    from nacl.signing import SigningKey

    from villagemesh.actors.bitchat.driver import make_announce
    from villagemesh.protocols.bitchat import encode
    from villagemesh.protocols.bitchat.carriage import wrap

    air = MemoryAir(live=True)
    b = node(runtime, air, "-b", NodeKeys.generate())
    evil_id = b"\xee" * 8
    evil = air.radio(evil_id)
    evil.start(lambda event: None)
    air.set_link(evil_id, _me(b), True)
    wait_links(runtime, b.actor, 1)
    a_keys = NodeKeys.generate()
    msg = envelope(a_keys, b"genuine")
    genuine = wrap(msg, a_keys.signing_key, peer_id(a_keys.static_public), int(time.time() * 1000))
    evil.send(_me(b), encode(dataclasses.replace(genuine, signature=bytes(64))))  # the forgery comes first
    stale = make_announce(SigningKey(b"\x05" * 32), b"\x06" * 32, "ghost", [], int(time.time() * 1000) - 3_600_000)
    evil.send(_me(b), encode(stale))  # an hour-old announce (BCH-01-011)
    evil.send(_me(b), encode(genuine))
    received = next_of(b.inbox, Received)
    assert decode_message(received.envelope) == msg and received.remote == a_keys.node_id
    (forged,) = recorder.wait_for("bitchat_packet_refused", reason="signature")
    assert forged["sender"] == genuine.sender_id.hex() and forged["link"] == evil_id.hex()
    recorder.wait_for("bitchat_packet_refused", reason="stale")
    counters = status(runtime, b.actor).counters
    assert counters["refused.signature"] == 1 and counters["refused.stale"] == 1
