"""The WebSocket transport: Noise-secured envelope sessions in binary WebSocket frames, on the acceptor's port.

Every WebSocket carries one authenticated session
(:class:`~villagemesh.actors.core.secure.session.Session`, driven by
:class:`~.link.SecureLink`): the server is the responder and learns the peer's
node id from the handshake; the client is the initiator and may insist on the
node id it dials. An envelope reaches ``on_message(message, raw, peer_id)`` only
if its ``sender`` is that authenticated peer: a spoofed sender is refused
(counted, logged), never delivered.

Server side (:class:`WebSocketServer`): an aiohttp ``web.Application`` with

- ``GET /villagemesh/ws``: the WebSocket; its binary frames carry the session's
  byte stream (see :mod:`.link` for the rules: handshake deadline, what closes a
  connection, what is only refused);
- ``GET /health``: plain HTTP, JSON ``{"status": "ok", "node_id", "connections",
  "authenticated", "received", "rejected", "envelopes_rejected"}``;
- whatever ``install(app)`` adds before the server starts (the node's read-only
  ``GET /villagemesh/status`` and dashboard, :mod:`villagemesh.dashboard`).

aiohttp is *not* given a listening socket. Its low-level ``web.Server`` is an
asyncio protocol factory (each call makes a ``RequestHandler``), so the
acceptor hands HTTP connections to it: in-loop with
``acceptor.route_in_loop(Route.HTTP, ws.protocol_factory)``, or from another
thread with :meth:`WebSocketServer.adopt`. Either way the handler sees the
request line the acceptor peeked first::

    client ──TCP──▶ acceptor ──sniff: HTTP──▶ aiohttp RequestHandler (peeked bytes first)
                                                 ├─ GET /health            → JSON
                                                 └─ GET /villagemesh/ws    → SecureLink(Session.responder)
                                                        Noise XX ──▶ peer id ──▶ envelopes (sender checked)
                                                        ──▶ on_message(message, raw, peer_id)

The server can also send on an authenticated inbound WebSocket
(:meth:`WebSocketServer.send`, by peer id).

Client side (:class:`WebSocketClient`): at most one outbound WebSocket per peer
URL, opened on first use, handshaken, and reused while it stays open; the link
is bound to the node id it authenticated, so a send that expects another node
id at that URL fails (:class:`ConnectError` naming both ids: the address now
belongs to someone else, and the intended peer surely did not get the bytes).
A send on a connection found closed reconnects once, with a new handshake.
``send(url, envelope, expected_peer=…)`` raises :class:`ConnectError` (cannot
reach, or cannot authenticate, the peer) or :class:`TransportTimeout` (the
WebSocket upgrade, the secure handshake or the write took too long), naming the
URL, or :class:`LocalProtocolError` (the envelope is not ours to send, naming its sender).
Envelopes a peer sends back on an outbound connection go to the same
``on_message``. The actor sends on outbound connections and receives on both,
so no address bookkeeping is needed for an inbound peer's ephemeral port.

Discovery over this transport: a peer advertised as ``ws://host:port`` is
probed with :func:`villagemesh.actors.lan.tcp.probe` on the same host and
port (the acceptor routes discovery JSON there); there is no HTTP announce route.

Log events (fixed keys): ``ws_connected`` (peer), plus :mod:`.link`'s
``session_failed`` and ``ws_callback_failed`` and the session's own.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeAlias

import aiohttp
import structlog
from aiohttp import web

from villagemesh.actors.core.handoff import HandedOff, adopt
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.core.secure.session import Session
from villagemesh.actors.core.secure.tcp import HANDSHAKE_TIMEOUT_S, EnvelopeHandler
from villagemesh.actors.websocket.link import CLOSE_TIMEOUT_S, MAX_MSG_SIZE, SecureLink
from villagemesh.errors import ConfigError, ConnectError, TransportTimeout, VillageMeshError

__all__ = [
    "HANDSHAKE_TIMEOUT_S",
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

OnMessage: TypeAlias = EnvelopeHandler
"""``on_message(message, raw, peer_id)``: an envelope from the authenticated peer ``peer_id``, on the loop's thread."""


def _check_timeout(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0 seconds, got {value!r}")


class WebSocketServer:
    """The aiohttp side: serves connections the acceptor hands over. Start and use it on one loop.

    Args:
        on_message: receives every envelope from an authenticated peer.
        keys: this node's keys (the responder's identity and Noise static key).
        handshake_timeout: seconds a new WebSocket has to complete the secure handshake.
        log: a structlog-shaped logger (default ``villagemesh.websocket``).

    Raises:
        ConfigError: a non-positive timeout.
    """

    def __init__(
        self,
        on_message: OnMessage,
        keys: NodeKeys,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
        log: Any = None,
        install: Callable[[web.Application], None] | None = None,
    ) -> None:
        _check_timeout("handshake_timeout", handshake_timeout)
        self.on_message = on_message
        self.keys = keys
        self.node_id = keys.node_id
        self.handshake_timeout = handshake_timeout
        self.log = log if log is not None else structlog.get_logger("villagemesh.websocket")
        self.counts: Counter[str] = Counter()
        self._open: dict[SecureLink, None] = {}  # an ordered set: the newest link last
        self.app = web.Application()
        self.app.router.add_get(WS_PATH, self._websocket)
        self.app.router.add_get("/health", self._health)
        if install is not None:
            install(self.app)  # the node's other read-only routes: the status endpoint, the dashboard
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

    async def send(self, peer_id: str, raw: bytes) -> None:
        """Send the encoded envelope ``raw`` on the newest authenticated inbound WebSocket from ``peer_id``.

        Raises:
            ConnectError: no open authenticated WebSocket from ``peer_id``, or the write failed.
            LocalProtocolError: ``raw`` is not a valid envelope of ours.
        """
        for link in reversed(list(self._open)):
            if link.peer_id == peer_id and not link.closed:
                await link.send(raw)
                return
        raise ConnectError(f"no authenticated inbound WebSocket from {peer_id!r}")

    async def send_many(self, peer_id: str, raws: list[bytes]) -> dict[int, str]:
        """:meth:`send` for several envelopes in one write; by index, why each not ours to send was left out.

        Raises:
            ConnectError: no open authenticated WebSocket from ``peer_id``, or the write failed.
        """
        for link in reversed(list(self._open)):
            if link.peer_id == peer_id and not link.closed:
                return await link.send_many(raws)
        raise ConnectError(f"no authenticated inbound WebSocket from {peer_id!r}")

    async def close(self) -> None:
        """Close every WebSocket (1001 going away; all at once, each waits for its peer's answer) and aiohttp's."""
        await asyncio.gather(*(link.close(aiohttp.WSCloseCode.GOING_AWAY, "server shutdown") for link in self._open))
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "node_id": self.node_id,
                "connections": len(self._open),
                "authenticated": sum(1 for link in self._open if link.peer_id is not None),
                "received": self.counts["received"],
                "rejected": self.counts["rejected"],
                "envelopes_rejected": self.counts["envelopes_rejected"],
            }
        )

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        # compress=False: encrypted bytes do not compress.
        ws = web.WebSocketResponse(
            max_msg_size=MAX_MSG_SIZE, heartbeat=HEARTBEAT_S, timeout=CLOSE_TIMEOUT_S, compress=False
        )
        await ws.prepare(request)
        peername = request.transport.get_extra_info("peername") if request.transport else None
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(request.remote)
        link = SecureLink(
            ws,
            Session.responder(self.keys.static_key, self.keys.signing_key, log=self.log),
            address=peer,
            on_message=self.on_message,
            counts=self.counts,
            log=self.log,
            handshake_timeout=self.handshake_timeout,
        )
        self._open[link] = None
        self.counts["connections"] += 1
        try:
            await link.run()
        finally:
            self._open.pop(link, None)
        return ws


class WebSocketClient:
    """Outbound WebSockets, one per peer URL, each a secure session bound to the peer it authenticated; one loop.

    Args:
        on_message: receives every envelope a peer sends back on an outbound connection.
        keys: this node's keys (the initiator's identity and Noise static key).
        connect_timeout: seconds for the TCP connect and the WebSocket upgrade.
        send_timeout: seconds for one write.
        handshake_timeout: seconds for the secure handshake once the WebSocket is open.
        log: a structlog-shaped logger (default ``villagemesh.websocket``).

    Raises:
        ConfigError: a non-positive timeout.
    """

    def __init__(
        self,
        on_message: OnMessage,
        keys: NodeKeys,
        *,
        connect_timeout: float = 5.0,
        send_timeout: float = 5.0,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
        log: Any = None,
    ) -> None:
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("send_timeout", send_timeout),
            ("handshake_timeout", handshake_timeout),
        ):
            _check_timeout(name, value)
        self.on_message = on_message
        self.keys = keys
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.handshake_timeout = handshake_timeout
        self.log = log if log is not None else structlog.get_logger("villagemesh.websocket")
        self.counts: Counter[str] = Counter()
        self._session: aiohttp.ClientSession | None = None
        self._links: dict[str, SecureLink] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._sending: set[asyncio.Task[Any]] = set()

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def connect(self, url: str, expected_peer: str | None = None) -> SecureLink:
        """The authenticated link to ``url`` (``ws://host:port``, the path is added), opening it if needed.

        Args:
            expected_peer: the node id that must answer at ``url`` (None: whoever does).

        Raises:
            ConfigError: ``expected_peer`` is not a node id.
            ConnectError: the peer cannot be reached, breaks the secure handshake, or is not ``expected_peer``.
            TransportTimeout: the WebSocket upgrade or the secure handshake took longer than its timeout.
        """
        lock = self._locks.setdefault(url, asyncio.Lock())
        async with lock:
            link = self._links.get(url)
            if link is not None and not link.closed:
                if expected_peer is not None and link.peer_id != expected_peer:
                    raise ConnectError(
                        f"WebSocket to {url}: expected peer {expected_peer}, "
                        f"but the open connection is authenticated as {link.peer_id}"
                    )
                return link
            await self._forget(url)
            session = Session.initiator(
                self.keys.static_key, self.keys.signing_key, expected_peer=expected_peer, log=self.log
            )
            link = SecureLink(
                await self._open(url),
                session,
                address=url,
                on_message=self.on_message,
                counts=self.counts,
                log=self.log,
                handshake_timeout=self.handshake_timeout,
            )
            self._links[url] = link
            self._readers[url] = asyncio.get_running_loop().create_task(link.run())
            try:
                await asyncio.shield(link.opened)  # bounded: the link fails it at its handshake deadline
            except TransportTimeout as exc:
                await self._forget(url)
                raise TransportTimeout(f"WebSocket to {url}: {exc}") from exc
            except VillageMeshError as exc:
                await self._forget(url)
                raise ConnectError(f"WebSocket to {url}: {exc}") from exc
            except asyncio.CancelledError:
                await self._forget(url)
                raise
            return link

    async def _open(self, url: str) -> aiohttp.ClientWebSocketResponse:
        target = url.rstrip("/") + WS_PATH if not url.rstrip("/").endswith(WS_PATH) else url
        try:
            ws = await asyncio.wait_for(
                self._session_now().ws_connect(
                    target,
                    max_msg_size=MAX_MSG_SIZE,
                    heartbeat=HEARTBEAT_S,
                    timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S),
                ),
                self.connect_timeout,
            )
        except TimeoutError as exc:
            raise TransportTimeout(f"WebSocket to {url}: no upgrade within {self.connect_timeout} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectError(f"WebSocket to {url}: {type(exc).__name__}: {exc}") from exc
        self.counts["connects"] += 1
        self.log.info("ws_connected", peer=url)
        return ws

    async def send(self, url: str, envelope: bytes, *, expected_peer: str | None = None) -> None:
        """Send the encoded ``envelope`` (its sender must be our node id) to the peer at ``url``.

        Args:
            expected_peer: the node id the envelope is meant for (None: whoever answers at ``url``).

        Raises:
            ConfigError: ``expected_peer`` is not a node id.
            ConnectError: the peer cannot be reached or authenticated, is not
                ``expected_peer`` (both ids named), or the connection broke and a reconnect failed.
            TransportTimeout: the upgrade, the handshake or the write took longer than its timeout.
            LocalProtocolError: ``envelope`` is not a valid envelope, or its sender is not our node id.
        """
        task = asyncio.current_task()
        assert task is not None  # a coroutine runs in a task
        self._sending.add(task)
        try:
            await self._send(url, envelope, expected_peer)
        finally:
            self._sending.discard(task)

    async def send_many(self, url: str, envelopes: list[bytes], *, expected_peer: str | None = None) -> dict[int, str]:
        """:meth:`send` for several envelopes in one write (they share secure frames).

        Returns, by index, why each envelope that is not ours to send was left out; the
        others are sent. Raises as :meth:`send` does for the whole group.
        """
        task = asyncio.current_task()
        assert task is not None  # a coroutine runs in a task
        self._sending.add(task)
        try:
            return await self._send(url, envelopes, expected_peer)
        finally:
            self._sending.discard(task)

    async def _send(self, url: str, envelope: bytes | list[bytes], expected_peer: str | None) -> dict[int, str]:
        for attempt in (1, 2):
            link = await self.connect(url, expected_peer)
            try:
                if isinstance(envelope, list):
                    return await asyncio.wait_for(link.send_many(envelope), self.send_timeout)
                await asyncio.wait_for(link.send(envelope), self.send_timeout)
            except TimeoutError as exc:
                await self._forget(url)  # a write cut mid-frame leaves the session's stream out of step
                raise TransportTimeout(f"WebSocket to {url}: send took over {self.send_timeout} s") from exc
            except ConnectError as exc:
                await self._forget(url)
                if attempt == 2:
                    raise ConnectError(f"WebSocket to {url}: {exc}") from exc
                self.counts["reconnects"] += 1
                continue
            return {}
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _forget(self, url: str) -> None:
        link = self._links.pop(url, None)
        reader = self._readers.pop(url, None)
        if link is not None:
            await link.close()
        if reader is not None:
            reader.cancel()

    async def close(self) -> None:
        """Cancel sends in progress, then close every outbound connection and the HTTP session.

        Sends are cancelled (their callers see CancelledError) and awaited, so none is left
        pending on a loop that is about to stop.
        """
        for task in list(self._sending):
            task.cancel()
        await asyncio.gather(*self._sending, return_exceptions=True)
        await asyncio.gather(*(self._forget(url) for url in list(self._links)))
        if self._session is not None:
            await self._session.close()
            self._session = None
