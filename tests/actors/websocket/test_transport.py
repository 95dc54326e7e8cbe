"""The WebSocket transport through the acceptor on loopback: frames, health, bad input, the client."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import structlog

from tests.actors.acceptor.support import fake_peer, run
from villagemesh.actors.acceptor.loopthread import LoopThread
from villagemesh.actors.acceptor.server import AcceptorServer
from villagemesh.actors.acceptor.state import Route
from villagemesh.actors.websocket.transport import WS_PATH, WebSocketClient, WebSocketServer
from villagemesh.errors import ConnectError, TransportTimeout
from villagemesh.protocols.envelope import MAX_PAYLOAD_BYTES, Message, Priority, encode_message


def message(payload: bytes = b"hello", kind: str = "DATA") -> Message:
    """A valid envelope."""
    return Message(
        id=os.urandom(16),
        kind=kind,
        sender="node-a",
        recipient="node-b",
        priority=Priority.NORMAL,
        created_at=1.0,
        ttl=60.0,
        correlation_id=None,
        payload=payload,
    )


class Inbox:
    """An on_message callback feeding an asyncio queue."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[Message, str]] = asyncio.Queue()

    def __call__(self, msg: Message, peer: str) -> None:
        self.queue.put_nowait((msg, peer))

    async def get(self) -> tuple[Message, str]:
        return await self.queue.get()


@asynccontextmanager
async def node(inbox: Inbox) -> AsyncIterator[tuple[WebSocketServer, str]]:
    """An acceptor whose HTTP route is the WebSocket server (in-loop); yields it and its ws:// URL."""
    ws_server = WebSocketServer(inbox, node_id="node-b")
    await ws_server.start()
    acceptor = AcceptorServer()
    acceptor.route_in_loop(Route.HTTP, ws_server.protocol_factory)
    _, port = await acceptor.start()
    try:
        yield ws_server, f"ws://127.0.0.1:{port}"
    finally:
        await acceptor.close()
        await ws_server.close()


def test_messages_arrive_through_the_acceptor_in_order() -> None:
    """Envelopes sent by the client come out of on_message equal and in order, with the peer address."""

    async def body() -> None:
        inbox = Inbox()
        async with node(inbox) as (_, url):
            client = WebSocketClient(Inbox())
            sent = [message(bytes([i]) * i) for i in range(20)]
            for m in sent:
                await client.send(url, m)
            got = [await inbox.get() for _ in sent]
            assert [m for m, _ in got] == sent
            assert got[0][1].startswith("127.0.0.1:")
            assert client.counts["connects"] == 1  # one connection, reused
            await client.close()

    run(body())


def test_health_answers_json_through_the_acceptor() -> None:
    """GET /health on the acceptor's port is routed to aiohttp and answers JSON."""

    async def body() -> dict[str, Any]:
        async with (
            node(Inbox()) as (_, url),
            aiohttp.ClientSession() as session,
            session.get(url.replace("ws://", "http://") + "/health") as resp,
        ):
            assert resp.status == 200
            return dict(await resp.json())

    health = run(body())
    assert health["status"] == "ok" and health["node_id"] == "node-b"


def test_cross_thread_hand_off_serves_websockets_on_another_loop() -> None:
    """The acceptor on one loop, the WebSocket server on another thread's loop: messages still arrive."""
    other = LoopThread("websocket")
    other.start()

    async def body() -> None:
        main = asyncio.get_running_loop()
        arrived: asyncio.Queue[Message] = asyncio.Queue()
        ws_server = WebSocketServer(lambda m, p: main.call_soon_threadsafe(arrived.put_nowait, m))
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(ws_server.start(), other.loop))
        acceptor = AcceptorServer()
        acceptor.route_hand_off(Route.HTTP, lambda h: asyncio.run_coroutine_threadsafe(ws_server.adopt(h), other.loop))
        _, port = await acceptor.start()
        client = WebSocketClient(Inbox())
        m = message(b"across threads")
        await client.send(f"ws://127.0.0.1:{port}", m)
        assert await arrived.get() == m
        await client.close()
        await acceptor.close()
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(ws_server.close(), other.loop))

    try:
        run(body())
    finally:
        other.stop()


@pytest.mark.parametrize(
    ("frame", "code"),
    [(b"\x09not an envelope", 1007), ("text", 1003), (encode_message(message())[:-1], 1007)],
)
def test_undecodable_frame_closes_that_connection_only(frame: bytes | str, code: int) -> None:
    """Garbage, text, or a truncated envelope: that socket is closed with a reason; others carry on."""

    async def body() -> list[dict[str, Any]]:
        inbox = Inbox()
        async with node(inbox) as (server, url), aiohttp.ClientSession() as session:
            with structlog.testing.capture_logs() as logs:
                async with session.ws_connect(url + WS_PATH) as bad:
                    if isinstance(frame, str):
                        await bad.send_str(frame)
                    else:
                        await bad.send_bytes(frame)
                    closing = await bad.receive()
                    assert closing.type is aiohttp.WSMsgType.CLOSE
                    assert closing.data == code
                    assert closing.extra
            client = WebSocketClient(Inbox())
            good = message(b"still serving")
            await client.send(url, good)
            assert (await inbox.get())[0] == good
            assert server.counts["rejected"] == 1
            await client.close()
        return logs

    (event,) = [e for e in run(body()) if e["event"] == "ws_message_rejected"]
    assert event["peer"].startswith("127.0.0.1:") and event["reason"]


def test_oversized_frame_is_refused() -> None:
    """A frame over MAX_MESSAGE_BYTES is refused by aiohttp with 1009; the server keeps serving."""

    async def body() -> None:
        inbox = Inbox()
        async with node(inbox) as (_, url), aiohttp.ClientSession() as session:
            with structlog.testing.capture_logs():
                async with session.ws_connect(url + WS_PATH) as big:
                    await big.send_bytes(b"\x01" * (MAX_PAYLOAD_BYTES + 4096))
                    closing = await big.receive()
                    assert closing.type is aiohttp.WSMsgType.CLOSE
                    assert closing.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
            client = WebSocketClient(Inbox())
            await client.send(url, message())
            await inbox.get()
            await client.close()

    run(body())


def test_failing_on_message_does_not_cut_the_peer_off() -> None:
    """on_message raising is counted and logged; later frames on the same connection still arrive."""

    async def body() -> None:
        seen: list[Message] = []

        def flaky(m: Message, peer: str) -> None:
            seen.append(m)
            if len(seen) == 1:
                raise RuntimeError("consumer bug")

        async with node(flaky) as (server, url):  # type: ignore[arg-type]
            client = WebSocketClient(Inbox())
            with structlog.testing.capture_logs():
                await client.send(url, message(b"1"))
                await client.send(url, message(b"2"))
                deadline = asyncio.get_running_loop().time() + 5
                while len(seen) < 2:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.005)
            assert server.counts["callback_failed"] == 1
            assert client.counts["connects"] == 1
            await client.close()

    run(body())


def test_client_reconnects_after_the_peer_restarts() -> None:
    """The server side drops every connection; the next send opens a new one and arrives."""

    async def body() -> None:
        inbox = Inbox()
        async with node(inbox) as (server, url):
            client = WebSocketClient(Inbox())
            await client.send(url, message(b"before"))
            await inbox.get()
            for ws in list(server._open):
                await ws.close()
            while not all(c.closed for c in client._conns.values()):
                await asyncio.sleep(0.005)  # the client's reader sees the close frame
            after = message(b"after")
            await client.send(url, after)
            assert (await inbox.get())[0] == after
            assert client.counts["connects"] == 2
            await client.close()

    run(body())


def test_send_to_a_closed_port_is_a_connect_error_naming_it() -> None:
    """Nobody listening: ConnectError with the URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def body() -> None:
        client = WebSocketClient(Inbox())
        try:
            with pytest.raises(ConnectError, match=f"ws://127.0.0.1:{port}"):
                await client.send(f"ws://127.0.0.1:{port}", message())
        finally:
            await client.close()

    run(body())


def test_send_to_a_silent_peer_times_out_naming_it() -> None:
    """A peer that accepts TCP and never answers the handshake: TransportTimeout with the URL."""

    async def body() -> None:
        async with fake_peer() as port:
            url = f"ws://127.0.0.1:{port}"
            client = WebSocketClient(Inbox(), connect_timeout=0.2)
            try:
                with pytest.raises(TransportTimeout, match=url):
                    await client.send(url, message())
            finally:
                await client.close()

    run(body())
