"""The WebSocket transport through the acceptor on loopback: secure sessions, health, bad input, the client."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web

from tests.actors.acceptor.support import fake_peer, run, until
from villagemesh.actors.acceptor.server import AcceptorServer
from villagemesh.actors.core.handoff import Route
from villagemesh.actors.core.loopthread import LoopThread
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.websocket.link import WS_FRAME_BYTES
from villagemesh.actors.websocket.transport import WS_PATH, WebSocketClient, WebSocketServer
from villagemesh.errors import ConfigError, ConnectError, LocalProtocolError, TransportTimeout
from villagemesh.protocols.envelope import MAX_PAYLOAD_BYTES, Message, Priority, encode_message, frame_message
from villagemesh.protocols.noise import NEED_DATA, HandshakeComplete, SecureChannel


def message(sender: str, payload: bytes = b"hello") -> Message:
    """A valid envelope from ``sender``."""
    return Message(
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


class Inbox:
    """An on_message callback feeding an asyncio queue with (message, raw, peer_id)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[Message, bytes, str]] = asyncio.Queue()

    def __call__(self, msg: Message, raw: bytes, peer_id: str) -> None:
        self.queue.put_nowait((msg, raw, peer_id))

    async def get(self) -> tuple[Message, bytes, str]:
        return await self.queue.get()


@asynccontextmanager
async def node(inbox: Any, keys: NodeKeys | None = None, **options: Any) -> AsyncIterator[tuple[WebSocketServer, str]]:
    """An acceptor whose HTTP route is the WebSocket server (in-loop); yields it and its ws:// URL."""
    ws_server = WebSocketServer(inbox, keys or NodeKeys.generate(), **options)
    await ws_server.start()
    acceptor = AcceptorServer()
    acceptor.route_in_loop(Route.HTTP, ws_server.protocol_factory)
    _, port = await acceptor.start()
    try:
        yield ws_server, f"ws://127.0.0.1:{port}"
    finally:
        await acceptor.close()
        await ws_server.close()


async def raw_handshake(ws: aiohttp.ClientWebSocketResponse, keys: NodeKeys) -> SecureChannel:
    """Run the Noise handshake by hand on ``ws`` (a peer that can then send anything through the channel)."""
    channel = SecureChannel.initiator(keys.static_key, keys.signing_key)
    await ws.send_bytes(channel.data_to_send())
    done = False
    while not done:
        frame = await ws.receive()
        assert frame.type is aiohttp.WSMsgType.BINARY
        channel.receive_data(frame.data)
        while (event := channel.next_event()) is not NEED_DATA:
            done = done or isinstance(event, HandshakeComplete)
    await ws.send_bytes(channel.data_to_send())
    return channel


def test_envelopes_arrive_in_order_from_the_authenticated_peer() -> None:
    """Envelopes sent by the client come out of on_message equal, in order, with the client's node id."""
    alice = NodeKeys.generate()

    async def body() -> None:
        inbox = Inbox()
        async with node(inbox) as (server, url):
            client = WebSocketClient(Inbox(), alice)
            sent = [message(alice.node_id, bytes([i]) * i) for i in range(20)]
            for m in sent:
                await client.send(url, encode_message(m), expected_peer=server.node_id)
            got = [await inbox.get() for _ in sent]
            assert [m for m, _, _ in got] == sent
            assert [raw for _, raw, _ in got] == [encode_message(m) for m in sent]
            assert {peer for _, _, peer in got} == {alice.node_id}
            assert client.counts["connects"] == 1 and client.counts["authenticated"] == 1  # one session, reused
            assert server.counts["authenticated"] == 1 and server.counts["received"] == 20
            assert client.counts["sent"] == 20
            await client.close()

    run(body())


def test_envelopes_flow_both_ways_on_one_connection() -> None:
    """The server sends on the client's inbound WebSocket; the client's reader delivers it with the server's id."""
    alice, bob = NodeKeys.generate(), NodeKeys.generate()

    async def body() -> None:
        at_bob, at_alice = Inbox(), Inbox()
        async with node(at_bob, bob) as (server, url):
            client = WebSocketClient(at_alice, alice)
            await client.send(url, encode_message(message(alice.node_id, b"ping")), expected_peer=bob.node_id)
            ping, _, from_alice = await at_bob.get()
            assert ping.payload == b"ping" and from_alice == alice.node_id
            await server.send(alice.node_id, encode_message(message(bob.node_id, b"pong")))
            pong, _, from_bob = await at_alice.get()
            assert pong.payload == b"pong" and from_bob == bob.node_id
            assert client.counts["connects"] == 1
            with pytest.raises(ConnectError, match="no authenticated inbound WebSocket from 'nobody'"):
                await server.send("nobody", encode_message(message(bob.node_id)))
            await client.close()

    run(body())


def test_many_envelopes_go_in_one_write_both_ways_and_one_not_ours_is_refused_by_index() -> None:
    """send_many from the client (30 at once, one not ours) and from the server: the rest arrive in order."""
    alice, bob = NodeKeys.generate(), NodeKeys.generate()

    async def body() -> None:
        at_bob, at_alice = Inbox(), Inbox()
        async with node(at_bob, bob) as (server, url):
            client = WebSocketClient(at_alice, alice)
            sent = [encode_message(message(alice.node_id, b"m%d" % i)) for i in range(30)]
            batch = [*sent[:10], encode_message(message(bob.node_id)), *sent[10:]]
            refused = await client.send_many(url, batch, expected_peer=bob.node_id)
            assert list(refused) == [10] and "sender" in refused[10]
            assert [(await at_bob.get())[1] for _ in sent] == sent
            assert client.counts["sent"] == 30
            back = [encode_message(message(bob.node_id, b"r%d" % i)) for i in range(5)]
            assert await server.send_many(alice.node_id, back) == {}
            assert [(await at_alice.get())[1] for _ in back] == back
            with pytest.raises(ConnectError, match="'nobody'"):
                await server.send_many("nobody", back)
            await client.close()

    run(body())


def test_envelope_larger_than_a_websocket_frame_arrives_whole() -> None:
    """A maximal envelope spans many WebSocket frames (each within the frame limit) and arrives intact."""
    alice = NodeKeys.generate()

    async def body() -> None:
        inbox = Inbox()
        async with node(inbox) as (_, url):
            client = WebSocketClient(Inbox(), alice)
            big = message(alice.node_id, os.urandom(MAX_PAYLOAD_BYTES))
            assert len(encode_message(big)) > 10 * WS_FRAME_BYTES
            await client.send(url, encode_message(big))
            assert (await inbox.get())[0] == big
            await client.close()

    run(body())


def test_health_answers_plain_json_through_the_acceptor() -> None:
    """GET /health on the acceptor's port is plain HTTP, routed to aiohttp, and names the node id of the keys."""
    bob = NodeKeys.generate()

    async def body() -> dict[str, Any]:
        async with (
            node(Inbox(), bob) as (_, url),
            aiohttp.ClientSession() as session,
            session.get(url.replace("ws://", "http://") + "/health") as resp,
        ):
            assert resp.status == 200
            return dict(await resp.json())

    health = run(body())
    assert health["status"] == "ok" and health["node_id"] == bob.node_id
    assert health["connections"] == 0 and health["rejected"] == 0 and health["envelopes_rejected"] == 0


def test_cross_thread_hand_off_serves_secure_websockets_on_another_loop() -> None:
    """The acceptor on one loop, the WebSocket server on another thread's loop: envelopes still arrive."""
    other = LoopThread("websocket")
    other.start()
    alice = NodeKeys.generate()

    async def body() -> None:
        main = asyncio.get_running_loop()
        arrived: asyncio.Queue[tuple[Message, str]] = asyncio.Queue()
        ws_server = WebSocketServer(
            lambda m, raw, peer_id: main.call_soon_threadsafe(arrived.put_nowait, (m, peer_id)), NodeKeys.generate()
        )
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(ws_server.start(), other.loop))
        acceptor = AcceptorServer()
        acceptor.route_hand_off(Route.HTTP, lambda h: asyncio.run_coroutine_threadsafe(ws_server.adopt(h), other.loop))
        _, port = await acceptor.start()
        client = WebSocketClient(Inbox(), alice)
        m = message(alice.node_id, b"across threads")
        await client.send(f"ws://127.0.0.1:{port}", encode_message(m), expected_peer=ws_server.node_id)
        assert await arrived.get() == (m, alice.node_id)
        await client.close()
        await acceptor.close()
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(ws_server.close(), other.loop))

    try:
        run(body())
    finally:
        other.stop()


def test_spoofed_sender_is_rejected_counted_and_never_delivered_and_the_connection_stays_up() -> None:
    """An authenticated peer claiming another node's id: refused and logged; its honest envelope still arrives."""
    mallory, alice = NodeKeys.generate(), NodeKeys.generate()

    async def body() -> tuple[WebSocketServer, list[MutableMapping[str, Any]]]:
        inbox = Inbox()
        async with node(inbox) as (server, url), aiohttp.ClientSession() as session:
            async with session.ws_connect(url + WS_PATH) as ws:
                channel = await raw_handshake(ws, mallory)
                spoofed, honest = message(alice.node_id, b"spoofed"), message(mallory.node_id, b"honest")
                with structlog.testing.capture_logs() as logs:
                    await ws.send_bytes(channel.send(frame_message(spoofed)))
                    await ws.send_bytes(channel.send(frame_message(honest)))
                    got, _, peer_id = await inbox.get()
                assert got == honest and peer_id == mallory.node_id
                assert inbox.queue.empty() and not ws.closed
            return server, logs

    server, logs = run(body())
    assert server.counts["envelopes_rejected"] == 1 and server.counts["received"] == 1
    assert server.counts["rejected"] == 0  # a bad envelope is not a broken connection
    [event] = [e for e in logs if e["event"] == "envelope_rejected"]
    assert event["kind"] == "sender" and event["peer_id"] == mallory.node_id and alice.node_id in event["reason"]


def test_wrong_expected_peer_is_a_connect_error_naming_both_ids_and_the_connection_is_closed() -> None:
    """Dialling a URL where another node answers: ConnectError with both ids; no connection is kept."""
    alice, bob, carol = NodeKeys.generate(), NodeKeys.generate(), NodeKeys.generate()

    async def body() -> None:
        inbox = Inbox()
        async with node(inbox, bob) as (server, url):
            client = WebSocketClient(Inbox(), alice)
            with (
                structlog.testing.capture_logs() as logs,
                pytest.raises(ConnectError, match=f"{url}.*{carol.node_id}.*{bob.node_id}"),
            ):
                await client.send(url, encode_message(message(alice.node_id)), expected_peer=carol.node_id)
            assert client._links == {} and client.counts["sent"] == 0
            [failed] = [e for e in logs if e["event"] == "session_failed"]
            assert failed["role"] == "initiator" and carol.node_id in failed["reason"]
            await until(lambda: server.counts["connections"] == 1 and not server._open)  # the server saw it close
            assert inbox.queue.empty()
            await client.close()

    run(body())


def test_open_connection_is_bound_to_the_peer_it_authenticated() -> None:
    """A connection opened for anyone serves its own peer id, and refuses a send meant for another, naming both."""
    alice, bob, carol = NodeKeys.generate(), NodeKeys.generate(), NodeKeys.generate()

    async def body() -> None:
        inbox = Inbox()
        async with node(inbox, bob) as (_, url):
            client = WebSocketClient(Inbox(), alice)
            await client.send(url, encode_message(message(alice.node_id, b"1")))
            with pytest.raises(ConnectError, match=f"{carol.node_id}.*{bob.node_id}"):
                await client.send(url, encode_message(message(alice.node_id, b"2")), expected_peer=carol.node_id)
            await client.send(url, encode_message(message(alice.node_id, b"3")), expected_peer=bob.node_id)
            assert [(await inbox.get())[0].payload for _ in range(2)] == [b"1", b"3"]
            assert client.counts["connects"] == 1
            await client.close()

    run(body())


def test_plain_envelope_frame_is_refused_and_that_connection_closed() -> None:
    """A raw WebSocket client sending an unencrypted envelope: closed with 1002, counted, nothing delivered."""

    async def body() -> tuple[WebSocketServer, list[MutableMapping[str, Any]]]:
        inbox = Inbox()
        async with node(inbox) as (server, url), aiohttp.ClientSession() as session:
            with structlog.testing.capture_logs() as logs:
                async with session.ws_connect(url + WS_PATH) as plain:
                    await plain.send_bytes(encode_message(message("a" * 32)))
                    closing = await plain.receive()
                    assert closing.type is aiohttp.WSMsgType.CLOSE
                    assert closing.data == aiohttp.WSCloseCode.PROTOCOL_ERROR and closing.extra
            alice = NodeKeys.generate()
            client = WebSocketClient(Inbox(), alice)  # others are still served
            await client.send(url, encode_message(message(alice.node_id)))
            assert (await inbox.get())[2] == alice.node_id
            assert inbox.queue.empty()
            await client.close()
        return server, logs

    server, logs = run(body())
    assert server.counts["rejected"] == 1 and server.counts["received"] == 1
    [event] = [e for e in logs if e["event"] == "session_failed"]
    assert event["peer"].startswith("127.0.0.1:") and event["role"] == "responder" and event["peer_id"] is None


def test_text_frame_is_refused_with_1003() -> None:
    """A text frame is no part of a secure session: that connection is closed with 1003 and counted."""

    async def body() -> WebSocketServer:
        async with node(Inbox()) as (server, url), aiohttp.ClientSession() as session:
            with structlog.testing.capture_logs():
                async with session.ws_connect(url + WS_PATH) as bad:
                    await bad.send_str("hello")
                    closing = await bad.receive()
                    assert closing.data == aiohttp.WSCloseCode.UNSUPPORTED_DATA
            return server

    assert run(body()).counts["rejected"] == 1


def test_client_that_never_handshakes_is_dropped_after_the_timeout() -> None:
    """A WebSocket opened and left silent is closed with 1008 once the handshake deadline passes."""

    async def body() -> tuple[WebSocketServer, list[MutableMapping[str, Any]]]:
        async with node(Inbox(), handshake_timeout=0.2) as (server, url), aiohttp.ClientSession() as session:
            with structlog.testing.capture_logs() as logs:
                async with session.ws_connect(url + WS_PATH) as silent:
                    closing = await silent.receive()
                    assert closing.type is aiohttp.WSMsgType.CLOSE
                    assert closing.data == aiohttp.WSCloseCode.POLICY_VIOLATION
                await until(lambda: not server._open)
            return server, logs

    server, logs = run(body())
    assert server.counts["rejected"] == 1 and server.counts["authenticated"] == 0
    [event] = [e for e in logs if e["event"] == "session_failed"]
    assert "handshake not complete within 0.2 s" in event["reason"]


def test_peer_that_never_answers_the_secure_handshake_times_out_naming_it() -> None:
    """A WebSocket server that upgrades but never speaks Noise: TransportTimeout with the URL, nothing kept."""

    async def mute(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    async def body() -> None:
        app = web.Application()
        app.router.add_get(WS_PATH, mute)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        alice = NodeKeys.generate()
        client = WebSocketClient(Inbox(), alice, handshake_timeout=0.2)
        try:
            with structlog.testing.capture_logs(), pytest.raises(TransportTimeout, match=r"handshake.*0\.2 s"):
                await client.send(f"ws://127.0.0.1:{port}", encode_message(message(alice.node_id)))
            assert client._links == {}
        finally:
            await client.close()
            await runner.cleanup()

    run(body())


def test_oversized_frame_is_refused() -> None:
    """A frame over WS_FRAME_BYTES is refused by aiohttp with 1009; the server keeps serving."""
    alice = NodeKeys.generate()

    async def body() -> None:
        inbox = Inbox()
        async with node(inbox) as (_, url), aiohttp.ClientSession() as session:
            with structlog.testing.capture_logs():
                async with session.ws_connect(url + WS_PATH) as big:
                    await big.send_bytes(b"\x01" * (WS_FRAME_BYTES + 1))
                    closing = await big.receive()
                    assert closing.type is aiohttp.WSMsgType.CLOSE
                    assert closing.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
            client = WebSocketClient(Inbox(), alice)
            await client.send(url, encode_message(message(alice.node_id)))
            await inbox.get()
            await client.close()

    run(body())


def test_sending_someone_elses_envelope_is_a_local_error_naming_the_sender() -> None:
    """An envelope whose sender is not our node id is refused before it leaves, naming that sender."""
    alice = NodeKeys.generate()

    async def body() -> None:
        inbox = Inbox()
        async with node(inbox) as (_, url):
            client = WebSocketClient(Inbox(), alice)
            with pytest.raises(LocalProtocolError, match="'someone-else'"):
                await client.send(url, encode_message(message("someone-else")))
            await client.send(url, encode_message(message(alice.node_id, b"mine")))  # the session is still fine
            assert (await inbox.get())[0].payload == b"mine"
            await client.close()

    run(body())


def test_failing_on_message_does_not_cut_the_peer_off() -> None:
    """on_message raising is counted and logged; later envelopes on the same connection still arrive."""
    alice = NodeKeys.generate()

    async def body() -> None:
        seen: list[Message] = []

        def flaky(m: Message, raw: bytes, peer_id: str) -> None:
            seen.append(m)
            if len(seen) == 1:
                raise RuntimeError("consumer bug")

        async with node(flaky) as (server, url):
            client = WebSocketClient(Inbox(), alice)
            with structlog.testing.capture_logs():
                await client.send(url, encode_message(message(alice.node_id, b"1")))
                await client.send(url, encode_message(message(alice.node_id, b"2")))
                await until(lambda: len(seen) == 2)
            assert server.counts["callback_failed"] == 1
            assert client.counts["connects"] == 1
            await client.close()

    run(body())


def test_client_reconnects_with_a_new_handshake_after_the_peer_drops_it() -> None:
    """The server side drops every connection; the next send opens and authenticates a new one."""
    alice = NodeKeys.generate()

    async def body() -> None:
        inbox = Inbox()
        async with node(inbox) as (server, url):
            client = WebSocketClient(Inbox(), alice)
            await client.send(url, encode_message(message(alice.node_id, b"before")))
            await inbox.get()
            for link in list(server._open):
                await link.close()
            await until(lambda: all(link.closed for link in client._links.values()))
            after = message(alice.node_id, b"after")
            await client.send(url, encode_message(after), expected_peer=server.node_id)
            assert (await inbox.get())[0] == after
            assert client.counts["connects"] == 2 and client.counts["authenticated"] == 2
            assert server.counts["authenticated"] == 2
            await client.close()

    run(body())


def test_send_to_a_closed_port_is_a_connect_error_naming_it() -> None:
    """Nobody listening: ConnectError with the URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def body() -> None:
        alice = NodeKeys.generate()
        client = WebSocketClient(Inbox(), alice)
        try:
            with pytest.raises(ConnectError, match=f"ws://127.0.0.1:{port}"):
                await client.send(f"ws://127.0.0.1:{port}", encode_message(message(alice.node_id)))
        finally:
            await client.close()

    run(body())


def test_send_to_a_silent_peer_times_out_naming_it() -> None:
    """A peer that accepts TCP and never answers the WebSocket upgrade: TransportTimeout with the URL."""

    async def body() -> None:
        async with fake_peer() as port:
            url = f"ws://127.0.0.1:{port}"
            alice = NodeKeys.generate()
            client = WebSocketClient(Inbox(), alice, connect_timeout=0.2)
            try:
                with pytest.raises(TransportTimeout, match=url):
                    await client.send(url, encode_message(message(alice.node_id)))
            finally:
                await client.close()

    run(body())


def test_expected_peer_must_be_a_node_id_and_timeouts_positive() -> None:
    """A malformed expected peer id is a ConfigError before any dialling; so is a non-positive timeout."""
    alice = NodeKeys.generate()

    async def body() -> None:
        client = WebSocketClient(Inbox(), alice)
        try:
            with pytest.raises(ConfigError, match="'peer-b'"):
                await client.send("ws://127.0.0.1:9", encode_message(message(alice.node_id)), expected_peer="peer-b")
            assert client.counts["connects"] == 0
        finally:
            await client.close()

    run(body())
    with pytest.raises(ConfigError, match="handshake_timeout"):
        WebSocketClient(Inbox(), alice, handshake_timeout=0)
    with pytest.raises(ConfigError, match="handshake_timeout"):
        WebSocketServer(Inbox(), alice, handshake_timeout=-1)


def test_close_cancels_sends_in_progress_so_none_outlives_the_client() -> None:
    """Sends waiting on a silent peer are cancelled and awaited by close(); no task is left pending."""

    async def body() -> None:
        async with fake_peer() as port:
            alice = NodeKeys.generate()
            client = WebSocketClient(Inbox(), alice, connect_timeout=30.0)
            url = f"ws://127.0.0.1:{port}"
            sends = [asyncio.create_task(client.send(url, encode_message(message(alice.node_id)))) for _ in range(3)]
            await until(lambda: len(client._sending) == 3)
            await client.close()
            assert all(task.cancelled() for task in sends) and not client._sending

    run(body())
