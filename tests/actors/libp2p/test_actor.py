"""The libp2p actor behind the acceptor actor on a real bus: the transport contract, limits, misbehaving peers."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import socket
from typing import Any

import pytest
from nacl.signing import SigningKey

from tests.actors.acceptor.support import WAIT, Sink, run, start
from tests.actors.transport_contract import Endpoint, TransportContract, envelope, next_of
from tests.interop.libp2p_dialer import Dialer
from villagemesh.actors.acceptor.actor import AcceptorActor, acceptor_status
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.core.transport import Received, Transmit, TransmitResult
from villagemesh.actors.libp2p.actor import Libp2pActor, libp2p_status
from villagemesh.actors.libp2p.state import ENVELOPE_PROTOCOL, Libp2pLimits, listen_multiaddr, target_of
from villagemesh.protocols.discovery import node_id_from_public_key
from villagemesh.protocols.envelope import decode_message, encode_message
from villagemesh.protocols.libp2p.multistream import HEADER, message
from villagemesh.protocols.libp2p.peerid import PeerId
from villagemesh.protocols.libp2p.varint import encode_uvarint, frame
from villagemesh.protocols.libp2p.yamux import MAX_STREAMS, Flag, Type, encode_frame


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


# -- peers that break the rules: cut off (typed, logged), the actor serves on ---------------------


def host_port(address: str) -> tuple[str, int]:
    target = target_of(address)
    return target.host, target.port


def still_serves(runtime: Any, inbox: queue.Queue[Any], address: str, keys: NodeKeys) -> None:
    """A well-behaved sender's envelope still reaches the actor's sink."""
    sender = NodeKeys.generate()
    s_inbox, _ = endpoint(runtime, "-probe", sender)
    msg = envelope(sender, b"still serving")
    runtime.bus.client().tell(
        "libp2p-probe", Transmit(msg.id, keys.node_id, address, encode_message(msg), "sink-probe")
    )
    assert next_of(s_inbox, TransmitResult).ok
    assert decode_message(next_of(inbox, Received).envelope) == msg


def test_an_envelope_whose_sender_is_not_the_authenticated_peer_is_refused(runtime: Any, recorder: Any) -> None:
    keys = NodeKeys.generate()
    inbox, address = endpoint(runtime, "", keys)
    me = SigningKey.generate()
    my_node = node_id_from_public_key(bytes(me.verify_key))
    spoofed, honest = envelope(NodeKeys.generate(), b"spoofed"), envelope(NodeKeys.generate(), b"honest")
    honest = dataclasses.replace(honest, sender=my_node)

    async def body() -> None:
        dialer = await Dialer.connect(*host_port(address), target_of(address).peer_id, identity=me)
        stream, _ = await dialer.open(ENVELOPE_PROTOCOL)
        dialer.write(stream, frame(encode_message(spoofed)) + frame(encode_message(honest)))
        await dialer.settle()
        await dialer.close()

    run(body())
    received = next_of(inbox, Received)
    assert decode_message(received.envelope) == honest and received.remote == my_node
    (event,) = recorder.wait_for("envelope_rejected")
    assert spoofed.sender in event["reason"] and my_node in event["reason"]


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        ("noise_message_1_corrupted", "message 1 is 32 bytes"),
        ("noise_frame_corrupted", "failed authentication"),
        ("frame_above_the_limit", "above the"),
        ("undecodable_envelope", "envelope"),
    ],
)
def test_a_peer_breaking_a_layer_is_cut_off_and_the_actor_serves_on(
    runtime: Any, recorder: Any, attack: str, reason: str
) -> None:
    keys = NodeKeys.generate()
    inbox, address = endpoint(runtime, "", keys, limits=Libp2pLimits(max_frame=4096))
    host, port = host_port(address)

    async def body() -> None:
        if attack == "noise_message_1_corrupted":
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(message(HEADER) + message("/noise") + b"\x00\x05hello")
            await asyncio.wait_for(reader.read(-1), WAIT)  # the header and the echo, then the close
            writer.close()
            return
        dialer = await Dialer.connect(host, port, target_of(address).peer_id)
        if attack == "noise_frame_corrupted":
            dialer.writer.write(b"\x00\x20" + bytes(32))  # a transport frame no key encrypted
        else:
            stream, _ = await dialer.open(ENVELOPE_PROTOCOL)
            body = encode_uvarint(5000) if attack == "frame_above_the_limit" else frame(b"\xff" * 64)
            dialer.write(stream, body)
        assert await dialer.closed_by_peer()
        await dialer.close()

    run(body())
    (event,) = recorder.wait_for("peer_cut_off")
    assert reason in event["reason"], event
    still_serves(runtime, inbox, address, keys)


def test_a_stream_flood_is_refused_stream_by_stream_and_the_actor_serves_on(runtime: Any, recorder: Any) -> None:
    """A peer opening streams past yamux's cap gets a reset for each one beyond it, counted and logged once."""
    keys = NodeKeys.generate()
    inbox, address = endpoint(runtime, "", keys)
    flood = MAX_STREAMS + 44

    async def body() -> None:
        dialer = await Dialer.connect(*host_port(address), target_of(address).peer_id)
        first = dialer.mux._next_id  # past our own session's cap: the SYNs are written by hand
        dialer.mux._next_id = first + 2 * flood
        dialer.write_raw_mux(
            b"".join(encode_frame(Type.WINDOW_UPDATE, Flag.SYN, first + 2 * n, 0) for n in range(flood))
        )
        await dialer.settle()
        await dialer.close()

    run(body())
    assert libp2p_status(runtime.bus.client()).counts["streams_refused"] >= flood - MAX_STREAMS
    (event,) = recorder.wait_for("libp2p_streams_refused")
    assert str(MAX_STREAMS) in event["reason"]
    still_serves(runtime, inbox, address, keys)


def test_a_peer_that_never_finishes_its_handshake_is_cut_off_at_the_deadline(runtime: Any, recorder: Any) -> None:
    keys = NodeKeys.generate()
    inbox, address = endpoint(runtime, "", keys, limits=Libp2pLimits(handshake_timeout_s=0.3))

    async def body() -> bytes:
        reader, writer = await asyncio.open_connection(*host_port(address))
        writer.write(message(HEADER) + message("/noise"))  # then silence
        data = await asyncio.wait_for(reader.read(-1), WAIT)  # until the actor closes
        writer.close()
        return data

    assert run(body()).startswith(message(HEADER))
    (event,) = recorder.wait_for("peer_cut_off")
    assert "within 0.3 s" in event["reason"] and event["error"] == "TransportTimeout"
    still_serves(runtime, inbox, address, keys)


def test_dials_past_the_pending_limit_fail_at_once_and_retryably(runtime: Any) -> None:
    """A peer that accepts TCP and never answers holds its dial until the handshake deadline; with one
    dial allowed at a time, a second dial is refused at once (retryable, naming the limit)."""
    keys = NodeKeys.generate()
    inbox, _ = endpoint(runtime, "", keys, limits=Libp2pLimits(max_pending_dials=1, handshake_timeout_s=3.0))
    mutes = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    try:
        client = runtime.bus.client()
        for mute in mutes:
            peer = NodeKeys.generate()
            address = listen_multiaddr("127.0.0.1", mute.getsockname()[1], PeerId.from_ed25519(peer.identity))
            msg = envelope(keys, b"to a mute peer")
            client.tell("libp2p", Transmit(msg.id, peer.node_id, address, encode_message(msg), "sink"))
        first = next_of(inbox, TransmitResult)
        assert not first.ok and first.retryable and "1 dials are in progress" in (first.error or "")
        second = next_of(inbox, TransmitResult)  # the other one, at its handshake deadline
        assert not second.ok and second.retryable and "handshake" in (second.error or ""), second
    finally:
        for mute in mutes:
            mute.close()


def test_a_refused_dial_backs_the_address_off_so_retries_do_not_dial_again(runtime: Any) -> None:
    """Nobody listens: the first Transmit dials and fails, the next ones within the backoff fail at once
    (retryable, naming the backoff and the failure behind it) without a second dial."""
    keys = NodeKeys.generate()
    inbox, _ = endpoint(runtime, "", keys, limits=Libp2pLimits(dial_backoff_s=30.0, dial_backoff_max_s=60.0))
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # the port refuses connections now
    peer = NodeKeys.generate()
    address = listen_multiaddr("127.0.0.1", port, PeerId.from_ed25519(peer.identity))
    client = runtime.bus.client()
    results = []
    for text in (b"first", b"second", b"third"):
        msg = envelope(keys, text)
        client.tell("libp2p", Transmit(msg.id, peer.node_id, address, encode_message(msg), "sink"))
        results.append(next_of(inbox, TransmitResult))
    assert all(not r.ok and r.retryable for r in results), results
    assert "in dial backoff" not in (results[0].error or "")
    for later in results[1:]:
        assert "in dial backoff" in (later.error or "") and "after 1 failed dial(s)" in (later.error or ""), later
    counts = libp2p_status(client).counts
    assert counts["dials"] == 1 and counts["dials_backed_off"] == 2, counts
