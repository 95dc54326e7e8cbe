"""Discovery JSON over TCP through the acceptor: signed answers, legacy clients, bad input."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections import Counter
from typing import Any

import pytest
import structlog
from nacl.signing import SigningKey

from tests.actors.acceptor.support import CAPS, fake_peer, run
from villagemesh.actors.acceptor.server import AcceptorServer
from villagemesh.actors.core.handoff import Route
from villagemesh.actors.lan.identity import Identity
from villagemesh.actors.lan.tcp import DiscoveryResponder, SignedFrames, probe
from villagemesh.errors import ConnectError, RemoteProtocolError, TransportTimeout
from villagemesh.protocols.discovery import (
    DiscoveryConnection,
    DiscoveryRequest,
    PeerList,
    PeerListRequest,
    decode_discovery,
    encode_discovery,
    relay,
)

ASKER = DiscoveryRequest(node_id="asker", addresses=("ws://127.0.0.1:1",), capabilities=CAPS, timestamp=1.0)


async def node(counts: Counter[str] | None = None) -> tuple[AcceptorServer, Identity]:
    """An acceptor on loopback with the discovery responder on its DISCOVERY route."""
    server = AcceptorServer()
    key = SigningKey.generate()
    _, port = await server.start()
    identity = Identity(key, (f"ws://127.0.0.1:{port}",), CAPS, port, clock=lambda: 1234.5)
    server.route_in_loop(Route.DISCOVERY, lambda: DiscoveryResponder(identity, counts=counts))
    return server, identity


def test_probe_returns_the_signed_response_and_a_latency() -> None:
    """A probe of the acceptor's port gets the node's verified response, bound to its key."""

    async def body() -> None:
        server, identity = await node()
        probed = await probe("127.0.0.1", identity.port, 5.0, request=ASKER)
        response, latency_ms = probed.response, probed.latency_ms
        assert response.node_id == identity.node_id
        assert response.addresses == identity.addresses
        assert response.capabilities == CAPS
        assert latency_ms > 0
        await server.close()

    run(body())


def test_legacy_client_gets_an_answer_it_can_read() -> None:
    """The replaced system's unsigned PEER_DISCOVERY gets sender_id and capabilities back."""

    async def body() -> dict[str, Any]:
        server, identity = await node()
        request = {
            "type": "PEER_DISCOVERY",
            "sender_id": "legacy-node",
            "sender_port": 4001,
            "timestamp": 1700000000.0,
            "capabilities": {
                "cpu_cores": 2,
                "ram_mb": 2048,
                "battery_percent": 55,
                "network_type": "wifi",
                "device_type": "phone",
                "performance_tier": "medium",
                "evolution_capacity": 0.4,
                "available_for_evolution": False,
                "trust_score": 0.5,
            },
            "protocol_version": "1.0",
        }
        body = json.dumps(request).encode()

        def legacy_client() -> dict[str, Any]:
            with socket.create_connection(("127.0.0.1", identity.port), timeout=5) as sock:
                sock.sendall(struct.pack(">I", len(body)) + body)
                (length,) = struct.unpack(">I", sock.recv(4, socket.MSG_WAITALL))
                return json.loads(sock.recv(length, socket.MSG_WAITALL))

        answer = await asyncio.to_thread(legacy_client)
        assert answer["sender_id"] == identity.node_id
        await server.close()
        return answer

    answer = run(body())
    assert answer["capabilities"]["cpu_cores"] == 4
    assert answer["capabilities"]["performance_tier"] == "high"
    assert answer["sender_port"] > 0


def test_bad_discovery_frame_is_closed_and_logged_and_the_node_keeps_serving() -> None:
    """A sniffed-as-discovery frame that is not valid JSON closes that connection only."""

    async def body() -> list[dict[str, Any]]:
        counts: Counter[str] = Counter()
        server, identity = await node(counts)
        with structlog.testing.capture_logs() as logs:
            reader, writer = await asyncio.open_connection("127.0.0.1", identity.port)
            writer.write(b"\x00\x00\x00\x05{nope")
            assert await reader.read() == b""
            writer.close()
        response = (await probe("127.0.0.1", identity.port, 5.0, request=ASKER)).response
        assert response.node_id == identity.node_id
        assert counts["rejected"] == 1
        await server.close()
        return logs

    (event,) = [e for e in run(body()) if e["event"] == "discovery_rejected"]
    assert "not JSON" in event["reason"]
    assert event["peer"].startswith("127.0.0.1:")


def test_idle_discovery_connection_is_closed() -> None:
    """A discovery connection that never completes a request is closed after the idle timeout."""

    async def body() -> None:
        server = AcceptorServer()
        _, port = await server.start()
        identity = Identity(SigningKey.generate(), (), CAPS, port)
        server.route_in_loop(Route.DISCOVERY, lambda: DiscoveryResponder(identity, idle_timeout_s=0.1))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x00\x00\x00\x40{")  # a frame that never finishes
        with structlog.testing.capture_logs():
            assert await reader.read() == b""
        writer.close()
        await server.close()

    run(body())


def test_probe_of_a_closed_port_is_a_connect_error_naming_it() -> None:
    """Nobody listening: ConnectError with the address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectError, match=f"127.0.0.1:{port}"):
        run(probe("127.0.0.1", port, 2.0, request=ASKER))


def test_probe_of_a_silent_peer_times_out_naming_it() -> None:
    """A peer that accepts and never answers: TransportTimeout with the address."""

    async def body() -> None:
        async with fake_peer() as port:
            with pytest.raises(TransportTimeout, match=f"127.0.0.1:{port}"):
                await probe("127.0.0.1", port, 0.2, request=ASKER)

    run(body())


def test_probe_refuses_an_answer_that_is_not_a_response() -> None:
    """A peer that answers a request with a request is a RemoteProtocolError."""

    async def body() -> None:
        async with fake_peer(answer=lambda request: request) as port:  # an echo: a request back
            with pytest.raises(RemoteProtocolError, match="expected a response"):
                await probe("127.0.0.1", port, 2.0, request=ASKER)

    run(body())


def test_an_exchange_introduces_the_prober_pushes_its_list_and_pulls_the_responders() -> None:
    """ANNOUNCE + PEER_LIST + requests in one write: the announce and the pushed list reach the hooks
    (a second pushed list on the connection does not), the request is not passed on for a probe back
    (the prober introduced itself), the list comes back with its cursor."""
    me = Identity(SigningKey.generate(), ("ws://127.0.0.1:1",), CAPS, 1)
    other = relay(encode_discovery(Identity(SigningKey.generate(), ("ws://127.0.0.1:2",), CAPS, 2).announce()))
    third = relay(encode_discovery(Identity(SigningKey.generate(), ("ws://127.0.0.1:3",), CAPS, 3).announce()))
    heard: list[Any] = []

    async def body() -> Any:
        server = AcceptorServer()
        _, port = await server.start()
        identity = Identity(SigningKey.generate(), (f"ws://127.0.0.1:{port}",), CAPS, port)

        def lists(want: PeerListRequest) -> bytes:
            heard.append(("want", want))
            return DiscoveryConnection().send(PeerList((third,), "b00c", 7))

        server.route_in_loop(
            Route.DISCOVERY,
            lambda: DiscoveryResponder(
                identity,
                on_request=lambda r: heard.append(("request", r.node_id)),
                on_announce=lambda a, body: heard.append(("announce", a.node_id, decode_discovery(body) == a)),
                on_peer_list=lambda listing, sender: heard.append(("pushed", listing.peers, sender)),
                peer_lists=lists,
            ),
        )
        conn = DiscoveryConnection()
        introduce = conn.send(me.announce()) + conn.send(PeerList((other,))) + conn.send(PeerList((third,)))
        asking = DiscoveryRequest(node_id=me.node_id, addresses=me.addresses, capabilities=CAPS, timestamp=1.0)
        probed = await probe(
            "127.0.0.1", port, 5.0, request=asking, want=PeerListRequest(8, "cafe", 3), introduce=introduce
        )
        await server.close()
        return probed

    probed = run(body())
    assert probed.peers == (third,) and probed.cursor == ("b00c", 7)
    assert decode_discovery(probed.body) == probed.response
    assert heard == [
        ("announce", me.node_id, True),
        ("pushed", (other,), me.node_id),
        ("want", PeerListRequest(8, "cafe", 3)),
    ]


def test_a_list_pushed_by_someone_who_did_not_introduce_itself_is_ignored() -> None:
    """No verified announce on the connection: the pushed list is counted, not passed on, and the
    request goes to on_request (to be probed back)."""
    counts: Counter[str] = Counter()
    heard: list[Any] = []
    pushed = relay(encode_discovery(Identity(SigningKey.generate(), ("ws://127.0.0.1:2",), CAPS, 2).announce()))

    async def body() -> None:
        server = AcceptorServer()
        _, port = await server.start()
        identity = Identity(SigningKey.generate(), (f"ws://127.0.0.1:{port}",), CAPS, port)
        server.route_in_loop(
            Route.DISCOVERY,
            lambda: DiscoveryResponder(
                identity,
                counts=counts,
                on_request=lambda r: heard.append(("request", r.node_id)),
                on_peer_list=lambda listing, sender: heard.append(("pushed", sender)),
            ),
        )
        probed = await probe(
            "127.0.0.1",
            port,
            5.0,
            request=ASKER,
            want=PeerListRequest(4),
            introduce=DiscoveryConnection().send(PeerList((pushed,))),
        )
        assert probed.peers == () and probed.cursor == ("", 0)  # no lists configured: an empty one
        await server.close()

    run(body())
    assert heard == [("request", "asker")]
    assert counts["ignored"] == 1 and counts["lists"] == 1


def test_signed_frames_are_reused_until_they_are_due_again() -> None:
    """One signature per reuse_s: the same bytes within it, a fresh signature after."""
    now = [0.0]
    identity = Identity(SigningKey.generate(), ("ws://127.0.0.1:1",), CAPS, 1, clock=lambda: now[0] + 1000)
    frames = SignedFrames(identity.response, reuse_s=1.0, clock=lambda: now[0])
    first = frames.framed()
    now[0] = 0.9
    assert frames.framed() is first
    now[0] = 1.0
    second = frames.framed()
    assert second != first
    conn = DiscoveryConnection()
    conn.receive_data(second)
    assert conn.next_event().timestamp == 1001.0  # type: ignore[union-attr]
