"""The WebSocket transport: envelope messages as binary WebSocket frames, through the acceptor's port.

Server side (:class:`WebSocketServer`): an aiohttp ``web.Application`` with

- ``GET /villagemesh/ws``: the WebSocket; each binary frame is one
  :func:`~villagemesh.protocols.envelope.encode_message` encoding, delivered to
  ``on_message(message, peer_address)``;
- ``GET /health``: JSON ``{"status": "ok", "node_id", "connections", "received", "rejected"}``.

aiohttp is *not* given a listening socket. Its low-level ``web.Server`` is an
asyncio protocol factory (each call makes a ``RequestHandler``), so the
acceptor hands HTTP connections to it: in-loop with
``acceptor.route_in_loop(Route.HTTP, ws.protocol_factory)``, or from another
thread with :meth:`WebSocketServer.adopt`. Either way the handler sees the
request line the acceptor peeked first::

    client ──TCP──▶ acceptor ──sniff: HTTP──▶ aiohttp RequestHandler (peeked bytes first)
                                                 ├─ GET /health            → JSON
                                                 └─ GET /villagemesh/ws    → frames → decode → on_message

Bad input: a frame that does not decode (or a text frame) closes *that*
connection with code 1007/1003 and the reason, counted in ``rejected`` and
logged as ``ws_message_rejected`` (keys ``peer``, ``reason``); frames over
``MAX_MESSAGE_BYTES`` are refused by aiohttp (``max_msg_size``) with 1009. An
``on_message`` that raises is logged (``ws_callback_failed``) and the
connection goes on: the consumer's bug is not the peer's fault.

Client side (:class:`WebSocketClient`): at most one outbound WebSocket per peer
URL, opened on first use and reused; a send on a connection found closed
reconnects once. ``send(url, message)`` raises :class:`ConnectError` (cannot
reach or keep the peer) or :class:`TransportTimeout`, naming the URL. Frames a
peer sends back on an outbound connection go to the same ``on_message``.
Connections are one-way by design: a node receives on its inbound
connections and sends on its outbound ones, so no address bookkeeping is
needed for an inbound peer's ephemeral port.

Discovery over this transport: a peer advertised as ``ws://host:port`` is
probed with :func:`villagemesh.actors.lan.tcp.probe` on the same host and
port (the acceptor routes discovery JSON there); there is no HTTP announce route.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from villagemesh.actors.acceptor.server import HandedOff, adopt
from villagemesh.errors import ConnectError, RemoteProtocolError, TransportTimeout
from villagemesh.protocols.envelope import MAX_MESSAGE_BYTES, Message, decode_message, encode_message

__all__ = [
    "HEARTBEAT_S",
    "KEEPALIVE_S",
    "WS_PATH",
    "OnMessage",
    "WebSocketClient",
    "WebSocketServer",
]

WS_PATH = "/villagemesh/ws"
"""Where the WebSocket lives; other paths are 404."""

HEARTBEAT_S = 30.0
"""WebSocket ping period: a dead peer is noticed within a minute (the replaced system's heartbeat was 30 s)."""

KEEPALIVE_S = 75.0
"""Idle HTTP keep-alive before aiohttp closes a connection (nginx's default); WebSockets use the heartbeat."""

OnMessage = Callable[[Message, str], None]
"""Receives each decoded message and the peer's address (``host:port`` or the URL), on the loop's thread."""


class WebSocketServer:
    """The aiohttp side: serves connections the acceptor hands over. Start and use it on one loop."""

    def __init__(self, on_message: OnMessage, *, node_id: str = "", log: Any = None) -> None:
        self.on_message = on_message
        self.node_id = node_id
        self.log = log if log is not None else structlog.get_logger("villagemesh.websocket")
        self.counts: Counter[str] = Counter()
        self._open: set[web.WebSocketResponse] = set()
        self.app = web.Application()
        self.app.router.add_get(WS_PATH, self._websocket)
        self.app.router.add_get("/health", self._health)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Build aiohttp's server (no socket of its own)."""
        self._runner = web.AppRunner(self.app, access_log=None, keepalive_timeout=KEEPALIVE_S)
        await self._runner.setup()

    @property
    def protocol_factory(self) -> Callable[[], asyncio.BaseProtocol]:
        """What the acceptor's in-loop HTTP route calls per connection."""
        if self._runner is None or self._runner.server is None:
            raise ConnectError("the WebSocket server is not started")
        return self._runner.server

    async def adopt(self, handed: HandedOff) -> None:
        """Serve a connection handed off by an acceptor on another thread (run this on our loop)."""
        await adopt(handed, self.protocol_factory)

    async def close(self) -> None:
        """Close every WebSocket (1001 going away) and aiohttp's connections."""
        for ws in list(self._open):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"server shutdown")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "node_id": self.node_id,
                "connections": len(self._open),
                "received": self.counts["received"],
                "rejected": self.counts["rejected"],
            }
        )

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, heartbeat=HEARTBEAT_S)
        await ws.prepare(request)
        peername = request.transport.get_extra_info("peername") if request.transport else None
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(request.remote)
        self._open.add(ws)
        self.counts["connections"] += 1
        try:
            await _pump(ws, peer, self.on_message, self.counts, self.log)
        finally:
            self._open.discard(ws)
        return ws


async def _pump(
    ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    peer: str,
    on_message: OnMessage,
    counts: Counter[str],
    log: Any,
) -> None:
    """Read frames until the connection ends; decode each; close on the first bad one."""
    async for frame in ws:
        if frame.type is aiohttp.WSMsgType.BINARY:
            try:
                message = decode_message(frame.data)
            except RemoteProtocolError as exc:
                await _refuse(ws, peer, aiohttp.WSCloseCode.INVALID_TEXT, str(exc), counts, log)
                return
            counts["received"] += 1
            try:
                on_message(message, peer)
            except Exception as exc:  # noqa: BLE001 - the consumer's bug must not cut the peer off
                counts["callback_failed"] += 1
                log.error("ws_callback_failed", peer=peer, error=f"{type(exc).__name__}: {exc}")
        elif frame.type is aiohttp.WSMsgType.TEXT:
            await _refuse(
                ws, peer, aiohttp.WSCloseCode.UNSUPPORTED_DATA, "text frames are not spoken here", counts, log
            )
            return
        elif frame.type is aiohttp.WSMsgType.ERROR:
            counts["rejected"] += 1
            log.warning("ws_message_rejected", peer=peer, reason=f"{type(ws.exception()).__name__}: {ws.exception()}")
            return


async def _refuse(
    ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    peer: str,
    code: int,
    reason: str,
    counts: Counter[str],
    log: Any,
) -> None:
    counts["rejected"] += 1
    log.warning("ws_message_rejected", peer=peer, reason=reason)
    await ws.close(code=code, message=reason.encode()[:120])  # a close reason must fit a control frame


class WebSocketClient:
    """Outbound WebSockets, one per peer URL, reused; use it on one loop."""

    def __init__(
        self,
        on_message: OnMessage,
        *,
        connect_timeout: float = 5.0,
        send_timeout: float = 5.0,
        log: Any = None,
    ) -> None:
        self.on_message = on_message
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.log = log if log is not None else structlog.get_logger("villagemesh.websocket")
        self.counts: Counter[str] = Counter()
        self._session: aiohttp.ClientSession | None = None
        self._conns: dict[str, aiohttp.ClientWebSocketResponse] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def connect(self, url: str) -> aiohttp.ClientWebSocketResponse:
        """The open WebSocket to ``url`` (``ws://host:port``, the path is added), opening it if needed."""
        lock = self._locks.setdefault(url, asyncio.Lock())
        async with lock:
            ws = self._conns.get(url)
            if ws is not None and not ws.closed:
                return ws
            ws = await self._open(url)
            self._conns[url] = ws
            self._readers[url] = asyncio.get_running_loop().create_task(self._read(url, ws))
            return ws

    async def _open(self, url: str) -> aiohttp.ClientWebSocketResponse:
        target = url.rstrip("/") + WS_PATH if not url.rstrip("/").endswith(WS_PATH) else url
        try:
            ws = await asyncio.wait_for(
                self._session_now().ws_connect(target, max_msg_size=MAX_MESSAGE_BYTES, heartbeat=HEARTBEAT_S),
                self.connect_timeout,
            )
        except TimeoutError as exc:
            raise TransportTimeout(f"WebSocket to {url}: no handshake within {self.connect_timeout} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectError(f"WebSocket to {url}: {type(exc).__name__}: {exc}") from exc
        self.counts["connects"] += 1
        self.log.info("ws_connected", peer=url)
        return ws

    async def _read(self, url: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        await _pump(ws, url, self.on_message, self.counts, self.log)

    async def send(self, url: str, message: Message) -> None:
        """Send ``message`` to the peer at ``url`` on its (re)used connection.

        Raises:
            ConnectError: the peer cannot be reached, or the connection broke and a reconnect failed.
            TransportTimeout: the handshake or the write took longer than its timeout.
        """
        data = encode_message(message)
        for attempt in (1, 2):
            ws = await self.connect(url)
            try:
                await asyncio.wait_for(ws.send_bytes(data), self.send_timeout)
            except TimeoutError as exc:
                raise TransportTimeout(f"WebSocket to {url}: send took over {self.send_timeout} s") from exc
            except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
                # aiohttp raises ConnectionResetError / ClientConnectionResetError on a closed socket.
                await self._forget(url)
                if attempt == 2:
                    raise ConnectError(f"WebSocket to {url}: {type(exc).__name__}: {exc}") from exc
                self.counts["reconnects"] += 1
                continue
            self.counts["sent"] += 1
            return

    async def _forget(self, url: str) -> None:
        ws = self._conns.pop(url, None)
        reader = self._readers.pop(url, None)
        if ws is not None:
            await ws.close()
        if reader is not None:
            reader.cancel()

    async def close(self) -> None:
        """Close every outbound connection and the HTTP session."""
        for url in list(self._conns):
            await self._forget(url)
        if self._session is not None:
            await self._session.close()
            self._session = None
