"""Secure sessions on real loopback TCP: served on the acceptor's SECURE route, dialled, timed out, refused."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import structlog

from villagemesh.actors.acceptor.server import AcceptorServer
from villagemesh.actors.acceptor.state import AcceptorLimits
from villagemesh.actors.core.handoff import HandedOff, Route, adopt
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.core.secure.session import Session
from villagemesh.actors.core.secure.tcp import SecureConnection, SecureProtocol, dial, responder_factory
from villagemesh.errors import ConfigError, ConnectError, RemoteProtocolError, TransportTimeout, VillageMeshError
from villagemesh.protocols.envelope import MAX_PAYLOAD_BYTES, Message, Priority, encode_message
from villagemesh.protocols.noise import HEADER

Inbox = asyncio.Queue[tuple[Message, bytes, str]]


def run(coro: Awaitable[Any], timeout: float = 15.0) -> Any:
    """Run one test body on a fresh loop, bounded."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def message(sender: str, payload: bytes = b"hello") -> bytes:
    return encode_message(
        Message(
            id=os.urandom(16),
            kind="DATA",
            sender=sender,
            recipient=None,
            priority=Priority.NORMAL,
            created_at=1.0,
            ttl=60.0,
            correlation_id=None,
            payload=payload,
        )
    )


def into(inbox: Inbox) -> Callable[[Message, bytes, str], None]:
    return lambda message, raw, peer_id: inbox.put_nowait((message, raw, peer_id))


async def dial_as(keys: NodeKeys, port: int, **options: Any) -> SecureConnection:
    """Dial 127.0.0.1:``port`` as ``keys``; ``options`` override expected_peer (None), on_envelope, timeout..."""
    options.setdefault("expected_peer", None)
    options.setdefault("on_envelope", into(Inbox()))
    return await dial("127.0.0.1", port, static_key=keys.static_key, signing_key=keys.signing_key, **options)


class Node:
    """An acceptor on loopback serving the SECURE route, recording what its sessions see."""

    def __init__(self, handshake_timeout: float = 5.0) -> None:
        self.keys = NodeKeys.generate()
        self.inbox: Inbox = asyncio.Queue()
        self.opened: asyncio.Queue[SecureConnection] = asyncio.Queue()
        self.closed: asyncio.Queue[tuple[SecureConnection, VillageMeshError | None]] = asyncio.Queue()
        self.server = AcceptorServer(AcceptorLimits(sniff_timeout_s=5.0))
        self.server.route_in_loop(
            Route.SECURE,
            responder_factory(
                static_key=self.keys.static_key,
                signing_key=self.keys.signing_key,
                on_envelope=into(self.inbox),
                on_open=self.opened.put_nowait,
                on_close=lambda conn, error: self.closed.put_nowait((conn, error)),
                handshake_timeout=handshake_timeout,
            ),
        )
        self.port = 0

    async def start(self) -> Node:
        _, self.port = await self.server.start()
        return self

    async def dial(self, keys: NodeKeys, inbox: Inbox, *, expected_peer: str | None = None) -> SecureConnection:
        return await dial_as(keys, self.port, expected_peer=expected_peer or self.keys.node_id, on_envelope=into(inbox))


def test_envelopes_flow_both_ways_through_the_acceptor() -> None:
    """A dialler reaches the acceptor's SECURE route; each side's envelopes arrive tagged with the other's id."""

    async def body() -> None:
        node = await Node().start()
        me, my_inbox = NodeKeys.generate(), Inbox()
        conn = await node.dial(me, my_inbox)
        assert (conn.peer_id, conn.identity) == (node.keys.node_id, node.keys.identity)
        assert conn.address == f"127.0.0.1:{node.port}" and not conn.is_closing
        served = await node.opened.get()
        assert served.peer_id == me.node_id
        assert served.session.handshake_hash == conn.session.handshake_hash
        ping = message(me.node_id, b"ping")
        conn.send_envelope(ping)
        got, raw, peer_id = await node.inbox.get()
        assert (raw, peer_id, got.payload) == (ping, me.node_id, b"ping")
        pong = message(node.keys.node_id, b"pong")
        served.send_envelope(pong)
        await served.drain()
        back, raw_back, from_id = await my_inbox.get()
        assert (raw_back, from_id, back.payload) == (pong, node.keys.node_id, b"pong")
        assert conn.counts == {"sent": 1, "received": 1}
        conn.close()
        await conn.wait_closed()
        closed, error = await node.closed.get()
        assert closed is served and error is None
        assert node.server.statistics()["routed.secure"] == 1
        await node.server.close()

    run(body())


def test_a_handed_off_connection_is_adopted_with_its_peeked_header() -> None:
    """Served via route_hand_off + adopt (as an actor owning another loop would), the session still authenticates."""

    async def body() -> None:
        keys, inbox = NodeKeys.generate(), Inbox()
        factory = responder_factory(static_key=keys.static_key, signing_key=keys.signing_key, on_envelope=into(inbox))
        server = AcceptorServer()
        adoptions: set[asyncio.Task[Any]] = set()

        def hand_off(handed: HandedOff) -> None:
            task = asyncio.get_running_loop().create_task(adopt(handed, factory))
            adoptions.add(task)

        server.route_hand_off(Route.SECURE, hand_off)
        _, port = await server.start()
        me = NodeKeys.generate()
        conn = await dial_as(me, port, expected_peer=keys.node_id)
        conn.send_envelope(message(me.node_id, b"via hand-off"))
        got, _, peer_id = await inbox.get()
        assert (got.payload, peer_id) == (b"via hand-off", me.node_id)
        [task] = adoptions
        transport, _ = task.result()
        conn.close()
        transport.close()
        await server.close()

    run(body())


def test_a_one_mebibyte_envelope_crosses_tcp_whole() -> None:
    """The largest envelope spans many Noise frames and TCP reads and arrives intact."""

    async def body() -> None:
        node = await Node().start()
        me = NodeKeys.generate()
        conn = await node.dial(me, Inbox())
        big = message(me.node_id, os.urandom(MAX_PAYLOAD_BYTES))
        conn.send_envelope(big)
        await conn.drain()
        _, raw, _ = await node.inbox.get()
        assert raw == big
        conn.close()
        await node.server.close()

    run(body())


def test_dialling_the_wrong_node_fails_naming_both_ids_and_the_address() -> None:
    """expected_peer guards the dial: another node answering is a RemoteProtocolError."""

    async def body() -> None:
        node = await Node().start()
        wanted = NodeKeys.generate().node_id
        with pytest.raises(RemoteProtocolError, match=rf"127\.0\.0\.1:{node.port}.*expected peer {wanted}"):
            await node.dial(NodeKeys.generate(), Inbox(), expected_peer=wanted)
        assert node.opened.empty()
        await node.server.close()

    run(body())


def test_slow_handshake_is_closed_after_the_timeout() -> None:
    """A client that sends the header and stalls is disconnected by the responder, with a logged reason."""

    async def body() -> list[dict[str, Any]]:
        node = await Node(handshake_timeout=0.2).start()
        with structlog.testing.capture_logs() as logs:
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            writer.write(HEADER)
            assert await reader.read() == b""  # EOF: the responder gave up on us
            writer.close()
        await node.server.close()
        return logs

    logs = run(body())
    [failed] = [e for e in logs if e["event"] == "session_failed"]
    assert "handshake not complete within 0.2 s" in failed["reason"] and failed["role"] == "responder"


def test_dial_times_out_on_a_peer_that_never_answers() -> None:
    """A listener that accepts and stays silent makes dial raise TransportTimeout naming the address."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        silent = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        me = NodeKeys.generate()
        with pytest.raises(TransportTimeout, match=rf"127\.0\.0\.1:{port}.*handshake not complete"):
            await dial_as(me, port, timeout=0.2)
        silent.close()
        await silent.wait_closed()

    run(body())


def test_dial_to_a_closed_port_is_a_connect_error_naming_the_address() -> None:
    """Nothing listening: ConnectError, with host and port in the message."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        probe = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        me = NodeKeys.generate()
        with pytest.raises(ConnectError, match=rf"127\.0\.0\.1:{port}"):
            await dial_as(me, port)

    run(body())


def test_peer_closing_during_the_handshake_is_a_connect_error() -> None:
    """A listener that hangs up at once makes dial raise ConnectError, not hang."""

    class HangUp(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.close()

    async def body() -> None:
        server = await asyncio.get_running_loop().create_server(HangUp, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        me = NodeKeys.generate()
        with pytest.raises(ConnectError, match=rf"127\.0\.0\.1:{port}"):
            await dial_as(me, port)
        server.close()
        await server.wait_closed()

    run(body())


def test_failing_envelope_callback_closes_that_connection_only() -> None:
    """An on_envelope that raises loses its connection (logged); the node goes on accepting."""

    def explode(message: Message, raw: bytes, peer_id: str) -> None:
        raise ValueError("consumer bug")

    async def body() -> list[dict[str, Any]]:
        node = await Node().start()
        me = NodeKeys.generate()
        ended: asyncio.Queue[VillageMeshError | None] = asyncio.Queue()
        with structlog.testing.capture_logs() as logs:
            conn = await dial_as(
                me,
                node.port,
                expected_peer=node.keys.node_id,
                on_envelope=explode,
                on_close=lambda _conn, error: ended.put_nowait(error),
            )
            served = await node.opened.get()
            served.send_envelope(message(node.keys.node_id))
            await conn.wait_closed()
            error = await ended.get()
            assert isinstance(error, ConnectError) and "consumer bug" in str(error)
            await node.closed.get()  # the responder's end closed too
            second = await node.dial(me, Inbox())
            assert second.peer_id == node.keys.node_id
            second.close()
        await node.server.close()
        return logs

    logs = run(body())
    [failed] = [e for e in logs if e["event"] == "session_failed"]
    assert "consumer bug" in failed["reason"] and failed["role"] == "initiator"


def test_failing_open_and_close_callbacks_are_logged_and_cost_only_that_connection() -> None:
    """on_open raising closes the connection (session_failed); on_close raising is logged, not propagated."""

    def bug(*_args: object) -> None:
        raise ValueError("callback bug")

    async def body() -> list[dict[str, Any]]:
        keys, closing = NodeKeys.generate(), asyncio.Event()

        def close_bug(*_args: object) -> None:
            closing.set()
            raise ValueError("callback bug")

        factory = responder_factory(
            static_key=keys.static_key, signing_key=keys.signing_key, on_envelope=bug, on_open=bug, on_close=close_bug
        )
        server = AcceptorServer()
        server.route_in_loop(Route.SECURE, factory)
        _, port = await server.start()
        with structlog.testing.capture_logs() as logs:
            conn = await dial_as(NodeKeys.generate(), port)
            await conn.wait_closed()
            await closing.wait()
            await server.close()
        return logs

    logs = run(body())
    [failed] = [e for e in logs if e["event"] == "session_failed"]
    assert "on_open raised ValueError('callback bug')" in failed["reason"]
    [close_failed] = [e for e in logs if e["event"] == "session_callback_failed"]
    assert "on_close raised" in close_failed["reason"] and close_failed["role"] == "responder"


def test_sending_on_a_closed_connection_is_a_connect_error() -> None:
    """send_envelope after close names the peer and refuses."""

    async def body() -> None:
        node = await Node().start()
        me = NodeKeys.generate()
        conn = await node.dial(me, Inbox())
        conn.close()
        await conn.wait_closed()
        with pytest.raises(ConnectError, match=node.keys.node_id):
            conn.send_envelope(message(me.node_id))
        await node.server.close()

    run(body())


def test_drain_waits_while_the_transport_asks_us_to_pause() -> None:
    """drain() returns at once normally, waits between pause_writing and resume_writing, and fails once closed."""

    async def body() -> None:
        node = await Node().start()
        me = NodeKeys.generate()
        protocol = SecureProtocol(
            Session.initiator(me.static_key, me.signing_key, expected_peer=node.keys.node_id), on_envelope=into(Inbox())
        )
        await asyncio.get_running_loop().create_connection(lambda: protocol, "127.0.0.1", node.port)
        conn = await protocol.opened()
        assert await protocol.opened() is conn
        await conn.drain()
        protocol.pause_writing()
        waiting = asyncio.create_task(conn.drain())
        await asyncio.sleep(0)  # let the task reach its await (a yield, not a timed wait)
        assert not waiting.done()
        protocol.resume_writing()
        await waiting
        protocol.pause_writing()
        stuck = asyncio.create_task(conn.drain())
        conn.close()
        with pytest.raises(ConnectError, match="closed"):
            await stuck
        await node.server.close()

    run(body())


def test_bad_configuration_is_refused_before_any_connection() -> None:
    """Bad keys and timeouts are ConfigErrors at the factory or the dial, naming the value."""
    keys = NodeKeys.generate()
    with pytest.raises(ConfigError, match="static"):
        responder_factory(static_key=b"short", signing_key=keys.signing_key, on_envelope=into(Inbox()))
    with pytest.raises(ConfigError, match="handshake_timeout"):
        responder_factory(
            static_key=keys.static_key, signing_key=keys.signing_key, on_envelope=into(Inbox()), handshake_timeout=0
        )

    async def body() -> None:
        with pytest.raises(ConfigError, match="timeout"):
            await dial_as(keys, 1, timeout=0)

    run(body())
