"""BetaNet relays on a real bus, behind real acceptors, over real Noise links: anonymous envelopes and their acks.

Each relay is a node's ``betanet`` actor with its own acceptor routing the
SECURE route to it; they know each other as mixnodes by config (a node learns
them from its registry). Delays are off unless a test turns them on.
"""

from __future__ import annotations

import asyncio
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pykka
import pytest

from tests.actors.acceptor.support import WAIT, Sink, start
from tests.actors.transport_contract import Endpoint, TransportContract
from villagemesh.actors.acceptor.actor import AcceptorActor, acceptor_status
from villagemesh.actors.betanet.actor import PACKET_KIND, BetanetActor, betanet_status
from villagemesh.actors.betanet.state import epoch_of, format_address, mix_secret
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.core.secure.tcp import dial
from villagemesh.actors.core.transport import REPLY_ADDRESS, Discover, Discovered, Received, Transmit, TransmitResult
from villagemesh.actors.registry.messages import PeerRoutes, RoutesList
from villagemesh.protocols.envelope import Message, Priority, decode_message, encode_message
from villagemesh.protocols.sphinx import Hop, create_packet
from villagemesh.protocols.sphinx.body import encode_drop
from villagemesh.protocols.sphinx.crypto import x25519_base
from villagemesh.protocols.sphinx.packet import PACKET_BYTES


@dataclass
class Relay:
    name: str
    keys: NodeKeys
    port: int
    address: str
    inbox: queue.Queue[Any]
    ref: pykka.ActorRef[Any] | None = None

    @property
    def node_id(self) -> str:
        return self.keys.node_id

    @property
    def mix_public(self) -> bytes:
        return x25519_base(mix_secret(self.keys.static_key))


def prepare(runtime: Any, suffix: str, keys: NodeKeys) -> Relay:
    """A sink and an acceptor routing SECURE to ``betanet{suffix}``; the relay to start there."""
    inbox: queue.Queue[Any] = queue.Queue()
    start(runtime, Sink, f"sink{suffix}", queue=inbox)
    start(runtime, AcceptorActor, f"acceptor{suffix}", routes={"secure": f"betanet{suffix}"})
    port = acceptor_status(runtime.bus.client(), f"acceptor{suffix}").port
    address = format_address("127.0.0.1", port, x25519_base(mix_secret(keys.static_key)))
    return Relay(f"betanet{suffix}", keys, port, address, inbox)


def start_relay(runtime: Any, tmp_path: Path, relay: Relay, directory: Any, **config: Any) -> Any:
    """Start (or restart) ``relay``'s actor, knowing ``directory`` (``[[node id, address], ...]``) as mixnodes."""
    return start(
        runtime,
        BetanetActor,
        relay.name,
        keys=relay.keys.to_bytes(),
        host="127.0.0.1",
        port=relay.port,
        replay_path=str(tmp_path / f"{relay.name}.sqlite3"),
        deliver_to=relay.name.replace("betanet", "sink", 1),
        mixnodes=directory,
        **config,
    )


def relays(runtime: Any, tmp_path: Path, count: int, **config: Any) -> list[Relay]:
    """``count`` relays that know each other; each delivers to its own sink."""
    made = [prepare(runtime, f"-{n}", NodeKeys.generate()) for n in range(count)]
    directory = [[r.node_id, r.address] for r in made]
    for relay in made:
        relay.ref = start_relay(runtime, tmp_path, relay, directory, **config)
    return made


def envelope(sender: str, payload: bytes, recipient: str | None = None) -> Message:
    return Message(os.urandom(16), "DATA", sender, recipient, Priority.NORMAL, time.time(), 60.0, None, payload)


def next_of(inbox: queue.Queue[Any], kind: type) -> Any:
    while True:
        item = inbox.get(timeout=WAIT)
        if isinstance(item, kind):
            return item


def transmit(runtime: Any, src: Relay, dst: Relay, msg: Message, address: str | None = None) -> None:
    sink = src.name.replace("betanet", "sink")
    request = Transmit(msg.id, dst.node_id, dst.address if address is None else address, encode_message(msg), sink)
    runtime.bus.client().tell(src.name, request)


def status_counts(runtime: Any, relay: Relay) -> dict[str, int]:
    return betanet_status(runtime.bus.client(), relay.name).counts


def wait_count(runtime: Any, relay: Relay, key: str, at_least: int = 1) -> dict[str, int]:
    deadline = time.monotonic() + WAIT
    while True:
        counts = status_counts(runtime, relay)
        if counts.get(key, 0) >= at_least:
            return counts
        assert time.monotonic() < deadline, f"{relay.name}: {key} never reached {at_least}: {counts}"
        time.sleep(0.02)


def test_an_envelope_crosses_three_mixes_and_its_ack_comes_back_on_the_surb(runtime: Any, tmp_path: Path) -> None:
    """A → 3 mixes → E: E gets it from A's node id (never A's address); E answers on A's SURB, A gets the answer."""
    nodes = relays(runtime, tmp_path, 5)
    alice, erin, mixes = nodes[0], nodes[4], nodes[1:4]
    msg = envelope(alice.node_id, b"anonymous hello", erin.node_id)
    transmit(runtime, alice, erin, msg)
    result = next_of(alice.inbox, TransmitResult)
    assert result.ok and result.transport == "betanet" and result.peer_id == erin.node_id
    received = next_of(erin.inbox, Received)
    assert received.transport == "betanet" and received.remote == alice.node_id
    assert decode_message(received.envelope) == msg
    assert all(status_counts(runtime, m).get("packets.unwrapped", 0) >= 1 for m in mixes)
    ack = envelope(erin.node_id, b"ack", alice.node_id)
    transmit(runtime, erin, alice, ack, address=REPLY_ADDRESS)
    assert next_of(erin.inbox, TransmitResult).ok
    answered = next_of(alice.inbox, Received)
    assert answered.remote == erin.node_id and decode_message(answered.envelope) == ack
    # a small message brought two SURBs: one more answer rides the second, a third has nothing to ride on
    transmit(runtime, erin, alice, envelope(erin.node_id, b"again"), address=REPLY_ADDRESS)
    assert next_of(erin.inbox, TransmitResult).ok
    assert decode_message(next_of(alice.inbox, Received).envelope).payload == b"again"
    transmit(runtime, erin, alice, envelope(erin.node_id, b"once more"), address=REPLY_ADDRESS)
    failed = next_of(erin.inbox, TransmitResult)
    assert not failed.ok and failed.retryable and "no reply block" in (failed.error or "")


def test_an_application_reply_rides_the_requests_surb_and_brings_one_for_its_own_ack(
    runtime: Any, tmp_path: Path
) -> None:
    """A request A → E; E's reply (correlation_id = the request) goes back on the request's SURB, not a new route,
    with a SURB of its own; A's ack of the reply rides that one."""
    nodes = relays(runtime, tmp_path, 5)
    alice, erin = nodes[0], nodes[4]
    request = envelope(alice.node_id, b"question", erin.node_id)
    transmit(runtime, alice, erin, request)
    assert decode_message(next_of(erin.inbox, Received).envelope) == request
    reply = Message(os.urandom(16), "DATA", erin.node_id, alice.node_id, Priority.NORMAL, time.time(), 60.0,
                    request.id, b"answer")
    transmit(runtime, erin, alice, reply)  # to alice's address: the SURB is chosen because it answers `request`
    got = next_of(alice.inbox, Received)
    assert got.remote == erin.node_id and decode_message(got.envelope) == reply
    counts = status_counts(runtime, erin)
    assert counts.get("sent.replies_on_surbs") == 1 and counts.get("sent.messages", 0) == 0
    ack = Message(os.urandom(16), "ACK", alice.node_id, erin.node_id, Priority.CRITICAL, time.time(), 60.0,
                  reply.id, b"")
    transmit(runtime, alice, erin, ack, address=REPLY_ADDRESS)
    assert decode_message(next_of(erin.inbox, Received).envelope) == ack
    assert status_counts(runtime, alice).get("sent.acks_on_surbs") == 1


def test_with_delays_on_every_message_still_arrives(runtime: Any, tmp_path: Path) -> None:
    """Sender-chosen exponential delays (mean 30 ms a hop): held, then forwarded, all arrive."""
    nodes = relays(runtime, tmp_path, 5, mean_delay_ms=30.0)
    sent = [envelope(nodes[0].node_id, b"m%d" % n) for n in range(10)]
    for msg in sent:
        transmit(runtime, nodes[0], nodes[4], msg)
    got = {decode_message(next_of(nodes[4].inbox, Received).envelope).payload for _ in sent}
    assert got == {m.payload for m in sent}


def test_too_few_mixnodes_or_a_bad_address_is_a_retryable_failure(runtime: Any, tmp_path: Path) -> None:
    nodes = relays(runtime, tmp_path, 3)
    transmit(runtime, nodes[0], nodes[2], envelope(nodes[0].node_id, b"x"))
    result = next_of(nodes[0].inbox, TransmitResult)
    assert not result.ok and result.retryable and "1 usable mixnode(s) known, a route needs 3" in (result.error or "")
    transmit(runtime, nodes[0], nodes[2], envelope(nodes[0].node_id, b"x"), address="betanet://nowhere")
    result = next_of(nodes[0].inbox, TransmitResult)
    assert not result.ok and result.retryable and "not a betanet address" in (result.error or "")


def test_an_envelope_too_large_for_a_packet_fails_over_at_once(runtime: Any, tmp_path: Path) -> None:
    nodes = relays(runtime, tmp_path, 5)
    transmit(runtime, nodes[0], nodes[4], envelope(nodes[0].node_id, bytes(4000)))
    result = next_of(nodes[0].inbox, TransmitResult)
    assert not result.ok and result.retryable and "at most 1437" in (result.error or "")


async def _send_raw(relay: Relay, packets: list[bytes]) -> None:
    """Be a neighbouring mix: a real Noise link to ``relay``, packets as betanet envelopes."""
    me = NodeKeys.generate()
    link = await dial(
        "127.0.0.1",
        relay.port,
        static_key=me.static_key,
        signing_key=me.signing_key,
        expected_peer=relay.node_id,
        on_envelope=lambda *_: None,
    )
    for p in packets:
        msg = Message(os.urandom(16), PACKET_KIND, me.node_id, relay.node_id, Priority.NORMAL, 0.0, 60.0, None, p)
        link.send_envelope(encode_message(msg))
    await link.drain()
    link.close()
    await link.wait_closed()


def test_garbage_and_replays_are_dropped_and_a_restart_does_not_reopen_a_replay(runtime: Any, tmp_path: Path) -> None:
    """Garbage costs a check and is counted; a packet seen before is refused, also by the relay's next instance."""
    nodes = relays(runtime, tmp_path, 1)
    relay = nodes[0]
    here = [Hop(bytes.fromhex(relay.node_id), relay.mix_public)]
    drop = create_packet(here, encode_drop(), [], epoch=epoch_of(time.time(), 3600))
    asyncio.run(_send_raw(relay, [os.urandom(PACKET_BYTES), b"short", drop, drop]))
    counts = wait_count(runtime, relay, "cover.drop_received")
    counts = wait_count(runtime, relay, "dropped.invalid", 3)
    assert counts["cover.drop_received"] == 1 and counts["dropped.invalid"] == 3
    assert relay.ref is not None
    relay.ref.stop(block=True, timeout=WAIT)
    relay.ref = start_relay(runtime, tmp_path, relay, [[relay.node_id, relay.address]])
    asyncio.run(_send_raw(relay, [drop]))
    counts = wait_count(runtime, relay, "dropped.invalid")
    assert counts.get("cover.drop_received", 0) == 0


def test_loop_cover_goes_round_and_comes_back(runtime: Any, tmp_path: Path) -> None:
    """Loop cover at 20 packets/s through three mixes back to the sender; drop cover is received by a mix."""
    nodes = relays(runtime, tmp_path, 4, loop_rate=20.0, drop_rate=20.0)
    counts = wait_count(runtime, nodes[0], "cover.loop_back", 3)
    assert counts["cover.loop_sent"] >= counts["cover.loop_back"]
    assert sum(status_counts(runtime, n).get("cover.drop_received", 0) for n in nodes) >= 1


def test_discover_is_answered_empty_for_the_same_round(runtime: Any, tmp_path: Path) -> None:
    nodes = relays(runtime, tmp_path, 1)
    runtime.bus.client().tell(nodes[0].name, Discover(3, 1.0, "sink-0"))
    found = next_of(nodes[0].inbox, Discovered)
    assert (found.round, found.transport, found.sightings) == (3, "betanet", ())


def test_a_flood_of_garbage_costs_a_check_each_and_real_traffic_still_passes(runtime: Any, tmp_path: Path) -> None:
    """2,000 random packets at a mix: each refused and counted, and a message through it arrives after them."""
    nodes = relays(runtime, tmp_path, 5)
    asyncio.run(_send_raw(nodes[1], [os.urandom(PACKET_BYTES) for _ in range(2000)]))
    wait_count(runtime, nodes[1], "dropped.invalid", 2000)
    msg = envelope(nodes[0].node_id, b"after the flood")
    transmit(runtime, nodes[0], nodes[4], msg)
    assert decode_message(next_of(nodes[4].inbox, Received).envelope) == msg


def test_at_an_epoch_boundary_old_packets_are_refused_by_their_epoch(runtime: Any, tmp_path: Path) -> None:
    """Epochs of 1 s: a packet two epochs old is refused; the new epoch's packets pass; old tags are pruned."""
    nodes = relays(runtime, tmp_path, 1, epoch_seconds=1.0)
    relay = nodes[0]
    here = [Hop(bytes.fromhex(relay.node_id), relay.mix_public)]
    old = epoch_of(time.time(), 1.0)
    stale = create_packet(here, encode_drop(), [], epoch=old)
    asyncio.run(_send_raw(relay, [stale]))
    wait_count(runtime, relay, "cover.drop_received")
    deadline = time.monotonic() + WAIT
    while betanet_status(runtime.bus.client(), relay.name).epoch < old + 2:
        assert time.monotonic() < deadline, "the relay's epoch never moved"
        time.sleep(0.05)
    again = create_packet(here, encode_drop(), [], epoch=old)
    fresh = create_packet(here, encode_drop(), [], epoch=epoch_of(time.time(), 1.0))
    asyncio.run(_send_raw(relay, [again, fresh]))
    counts = wait_count(runtime, relay, "cover.drop_received", 2)
    assert counts.get("dropped.invalid", 0) == 1


class TestBetanetKeepsTheTransportContract(TransportContract):
    """The kit's contract suite on BetaNet; each endpoint is a relay, with three more mixes between them."""

    NAME = "betanet"
    UNREACHABLE = "betanet://nowhere"  # not a usable address: fails at once, retryable
    ORDERED = False
    SEES_PEER = False
    WHY = (
        "every message takes its own route through three mixes and may be held on the way, and the sender"
        " never talks to the recipient (that is the point): it cannot see who answers at an address"
    )

    @pytest.fixture
    def transport_factory(self, tmp_path: Path) -> Any:
        made: list[Relay] = []

        def add(runtime: Any, suffix: str, keys: NodeKeys) -> Relay:
            relay = prepare(runtime, suffix, keys)
            relay.ref = start_relay(runtime, tmp_path, relay, [])  # mixnodes come by RoutesList below
            made.append(relay)
            return relay

        def make(runtime: Any, suffix: str, keys: NodeKeys) -> Endpoint:
            if not made:
                for n in range(3):
                    add(runtime, f"-mix{n}", NodeKeys.generate())
            relay = add(runtime, suffix, keys)
            routes = RoutesList(tuple(PeerRoutes(r.node_id, (("betanet", (r.address,)),)) for r in made))
            for r in made:  # what a registry would tell them: every relay, this one included
                runtime.bus.client().tell(r.name, routes)
            return Endpoint(relay.name, f"sink{suffix}", relay.inbox, relay.address, keys)

        return make
