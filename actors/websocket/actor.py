"""The WebSocket actor: owns the aiohttp server and client on its own loop thread.

Thin by design (the logic lives in :mod:`.transport`)::

    acceptor ──ConnectionHandedOff(fd)──▶ handle ──▶ loop: server.adopt ──▶ aiohttp
    aiohttp frame ──on_message (loop)──▶ actor_ref.tell ──▶ handle ──bus──▶ deliver_to: EnvelopeReceived
    anyone ──SendEnvelope──▶ handle ──▶ loop: client.send ──done (loop)──▶ actor_ref.tell ──▶ reply_to

Nothing blocks the actor on the network: a send is started on the loop and
its outcome comes back to the actor as a message. Bus sockets are used only
in the actor's thread, so the loop thread reaches the actor through pykka's
own queue.

Config (``ctx.config``): ``deliver_to`` (actor name for incoming envelopes;
without it they are counted and dropped), ``node_id`` (shown by ``/health``),
``connect_timeout`` / ``send_timeout`` (seconds, default 5).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
from dataclasses import dataclass
from typing import Any

import pykka

from villagemesh.actors.acceptor.loopthread import EventLogLogger, LoopThread
from villagemesh.actors.acceptor.messages import ConnectionHandedOff
from villagemesh.actors.acceptor.server import HandedOff
from villagemesh.actors.acceptor.state import Route
from villagemesh.actors.base import Actor
from villagemesh.actors.bus import Sender
from villagemesh.actors.websocket.messages import (
    EnvelopeReceived,
    EnvelopeSent,
    GetWebSocketStatus,
    SendEnvelope,
    SendFailed,
    WebSocketStatus,
)
from villagemesh.actors.websocket.transport import WebSocketClient, WebSocketServer
from villagemesh.errors import BusError, RemoteProtocolError, VillageMeshError
from villagemesh.protocols.envelope import Message, decode_message, encode_message

__all__ = ["WebSocketActor", "send_envelope", "websocket_status"]

LOOP_CALL_TIMEOUT_S = 5.0
"""Starting, stopping or reading counters on the loop takes milliseconds."""


@dataclass(frozen=True, slots=True)
class _Incoming:
    message: Message
    peer: str


@dataclass(frozen=True, slots=True)
class _SendDone:
    request: SendEnvelope
    message_id: bytes
    error: BaseException | None


class WebSocketActor(Actor):
    """Serves WebSockets handed off by the acceptor; sends envelopes to peers' WebSockets."""

    def on_start(self) -> None:
        config = self.ctx.config
        self.deliver_to: str | None = config.get("deliver_to")
        self.io_log = EventLogLogger(self.ctx.log, actor=self.name)
        self.server = WebSocketServer(self._from_loop, node_id=str(config.get("node_id", "")), log=self.io_log)
        self.client = WebSocketClient(
            self._from_loop,
            connect_timeout=float(config.get("connect_timeout", 5.0)),
            send_timeout=float(config.get("send_timeout", 5.0)),
            log=self.io_log,
        )
        self.dropped = 0
        self.io_loop = LoopThread(f"{self.name}-loop")
        self.io_loop.start(lambda target, name: self.spawn_thread(target, name=name))
        self.io_loop.call(self.server.start(), LOOP_CALL_TIMEOUT_S)

    def on_stop(self) -> None:
        if not self.io_loop.loop.is_closed():
            self.io_loop.call(self._shutdown(), LOOP_CALL_TIMEOUT_S)
        self.io_loop.stop()

    async def _shutdown(self) -> None:
        await self.client.close()
        await self.server.close()

    # -- loop thread → actor thread -------------------------------------------------------------

    def _from_loop(self, message: Message, peer: str) -> None:
        self._to_actor(_Incoming(message, peer))

    def _to_actor(self, msg: object) -> None:
        try:
            self.actor_ref.tell(msg)
        except pykka.ActorDeadError:
            return  # the instance is ending; its successor starts clean

    def on_receive(self, message: Any) -> Any:
        """Internal messages from the loop thread."""
        if isinstance(message, _Incoming):
            if self.deliver_to is None:
                self.dropped += 1
                return None
            self.tell(self.deliver_to, EnvelopeReceived(encode_message(message.message), message.peer))
            return None
        if isinstance(message, _SendDone):
            self._send_outcome(message)
            return None
        return super().on_receive(message)

    # -- bus messages -------------------------------------------------------------------------------

    def handle(self, msg: Any) -> Any:
        """:class:`ConnectionHandedOff`, :class:`SendEnvelope`, :class:`GetWebSocketStatus`."""
        if isinstance(msg, ConnectionHandedOff):
            handed = HandedOff(socket.socket(fileno=msg.fd), msg.peeked, msg.peer, Route(msg.route))
            future = asyncio.run_coroutine_threadsafe(self.server.adopt(handed), self.io_loop.loop)
            future.add_done_callback(lambda f: self._adopted(f, handed.peer))
            return None
        if isinstance(msg, SendEnvelope):
            self._start_send(msg)
            return None
        if isinstance(msg, GetWebSocketStatus):
            return self.io_loop.call(self._statistics(), LOOP_CALL_TIMEOUT_S)
        return super().handle(msg)

    def _adopted(self, future: concurrent.futures.Future[None], peer: str) -> None:
        exc = future.exception() if not future.cancelled() else asyncio.CancelledError("adoption cancelled")
        if exc is not None:
            self.io_log.warning(
                "connection_rejected", peer=peer, reason=f"adoption failed: {exc}", protocol="http", peeked_bytes=0
            )

    def _start_send(self, request: SendEnvelope) -> None:
        try:
            message = decode_message(request.envelope)
        except RemoteProtocolError as exc:
            self._reply(request, SendFailed(request.url, b"", "RemoteProtocolError", str(exc)))
            return
        future = asyncio.run_coroutine_threadsafe(self.client.send(request.url, message), self.io_loop.loop)

        def done(f: concurrent.futures.Future[None]) -> None:
            error = f.exception() if not f.cancelled() else asyncio.CancelledError("send cancelled")
            self._to_actor(_SendDone(request, message.id, error))

        future.add_done_callback(done)

    def _send_outcome(self, done: _SendDone) -> None:
        request = done.request
        if done.error is None:
            self._reply(request, EnvelopeSent(request.url, done.message_id))
        elif isinstance(done.error, VillageMeshError | asyncio.CancelledError):
            error = done.error
            self._reply(request, SendFailed(request.url, done.message_id, type(error).__name__, str(error)))
        else:
            raise done.error  # not a transport failure: a bug, let the supervisor see it

    def _reply(self, request: SendEnvelope, outcome: object) -> None:
        if request.reply_to is None:
            return
        try:
            self.tell(request.reply_to, outcome)
        except BusError as exc:
            self.io_log.warning("send_outcome_undeliverable", to=request.reply_to, reason=str(exc))

    async def _statistics(self) -> WebSocketStatus:
        return WebSocketStatus(dict(self.server.counts), dict(self.client.counts))


def send_envelope(
    client: Sender, message: Message, url: str, *, name: str = "websocket", reply_to: str | None = None
) -> None:
    """Ask the WebSocket actor to send ``message`` to ``url``; the outcome is told to ``reply_to``."""
    client.tell(name, SendEnvelope(url, encode_message(message), reply_to))


def websocket_status(client: Sender, name: str = "websocket", *, timeout: float = 5.0) -> WebSocketStatus:
    """The WebSocket actor's counters."""
    reply = client.ask(name, GetWebSocketStatus(), timeout=timeout)
    if not isinstance(reply, WebSocketStatus):
        raise BusError(f"websocket actor {name!r} answered {reply!r}")
    return reply
