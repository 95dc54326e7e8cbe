"""The application gateway actor: the one place application code runs inside the node.

It speaks the retrier's application protocol
(:mod:`villagemesh.actors.retrier.messages`): for each ``Incoming`` (a new,
deduplicated message) it dispatches the message to every subscriber of its
kind; ``MessageDelivered`` and ``MessageFailed`` resolve delivery handles.

Dispatch is exactly once for handlers that return (the argument is in
:mod:`villagemesh.actors.core.ledger`). The gateway commits both marks itself,
in its own thread, on its own connection to the inbox file, rather than telling
the retrier and letting it commit later (a ``kill -9`` in between used to
dispatch several handled messages again)::

    Incoming ─► Inbox.begin_dispatch (commit) ─► handlers ─► Inbox.mark_handled (commit)

``begin_dispatch`` refuses a message already handled (a second ``Incoming``
for it, e.g. from a restarted retrier) and counts dispatches, so the one
message whose handlers were running when the process died is dispatched again
after the restart as an :class:`~.state.InboundMessage` with ``redelivered``
set; every other dispatch is a first one. A new gateway instance (after a
crash, or at the node's start) first re-dispatches those begun and never
finished; the retrier's ``Incoming`` for them then finds them handled.

A plain handler is called in this thread; the mark is committed when the last
one returns. A coroutine handler runs on the event loop it subscribed from,
and the mark waits for it: the gateway goes on with other messages meanwhile
and commits when the coroutine's completion comes back as a message (it
never blocks on a loop, which might itself be waiting for this gateway to
resolve a delivery handle).

A message whose dispatch began :data:`MAX_DISPATCHES` times without ever
finishing is *poison*: a handler that kills its process (a native crash) or
the gateway every time would otherwise bring the node down on every start.
It is not dispatched again: it is marked handled and logged
(``message_poisoned``, level error, with the message id, kind and sender) for
the operator.

A subscriber that raises is the application's fault, not the gateway's: the
exception is logged (``handler_failed``, with the traceback) and the other
subscribers still run; the message counts as handled. Letting it crash the
gateway would dispatch the same message again after the restart, forever.

Config: ``subscribers`` (Subscribers), ``handles`` (HandleTable), ``inbox``
(the retrier's SQLite file, required), ``synchronous`` (NORMAL or FULL),
``max_dispatches`` (default :data:`MAX_DISPATCHES`).
Log events: ``handler_failed`` (kind, handler, exc_type, exc_message,
traceback), ``message_rejected`` (actor, reason), ``message_redelivered``
(message_id, dispatches), ``message_already_handled`` (message_id),
``message_poisoned`` (message_id, kind, sender, dispatches).
"""

from __future__ import annotations

import asyncio
import traceback
from concurrent.futures import Future
from typing import Any

import pykka

from villagemesh.actors.app.messages import CoroutineDone
from villagemesh.actors.app.state import HandleTable, InboundMessage, Subscribers
from villagemesh.actors.core.base import Actor, ActorContext
from villagemesh.actors.core.ledger import Inbox
from villagemesh.actors.retrier.messages import Incoming, MessageDelivered, MessageFailed
from villagemesh.errors import ConfigError, ProtocolError
from villagemesh.protocols.envelope import decode_message

__all__ = ["MAX_DISPATCHES", "AppActor"]

MAX_DISPATCHES = 3
"""Dispatches of one message that may begin without finishing (the first and two redeliveries,
each ended by a death mid-handler) before it counts as poison and is set aside."""


class AppActor(Actor):
    """Config: ``subscribers`` (Subscribers), ``handles`` (HandleTable), ``inbox`` (path), ``synchronous``."""

    def __init__(self, ctx: ActorContext) -> None:
        super().__init__(ctx)
        self.subscribers: Subscribers = ctx.config["subscribers"]
        self.handles: HandleTable = ctx.config["handles"]
        path = ctx.config.get("inbox")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"the app gateway needs config['inbox'] (the inbox file, a non-empty str), got {path!r}")
        self.inbox_path: str = path
        self.synchronous = str(ctx.config.get("synchronous", "NORMAL"))
        self.max_dispatches = ctx.config.get("max_dispatches", MAX_DISPATCHES)
        if not isinstance(self.max_dispatches, int) or isinstance(self.max_dispatches, bool) or self.max_dispatches < 1:
            raise ConfigError(f"max_dispatches must be an int >= 1, got {self.max_dispatches!r}")

    def on_start(self) -> None:
        self.inbox = Inbox(self.inbox_path, synchronous=self.synchronous)
        self.running: dict[bytes, int] = {}
        """Messages with coroutine handlers still running: how many."""
        # A previous instance (or process) died while these ran: dispatch them again now, flagged.
        # (The retrier re-sends every unhandled message when it starts; those Incomings find
        # these handled.)
        for message_id in self.inbox.unfinished():
            envelope = self.inbox.payload(message_id)
            if envelope is not None:
                self._dispatch_inbound(Incoming(message_id, envelope))

    def on_stop(self) -> None:
        self.inbox.close()

    def handle(self, msg: Any) -> Any:
        if isinstance(msg, Incoming):
            self._dispatch_inbound(msg)
        elif isinstance(msg, MessageDelivered):
            self.handles.resolve(msg.message_id, True, msg.attempts, None)
        elif isinstance(msg, MessageFailed):
            self.handles.resolve(msg.message_id, False, msg.attempts, f"{msg.reason}: {msg.last_error}")
        else:
            raise TypeError(f"app gateway got an unexpected {type(msg).__name__}")
        return None

    def on_receive(self, message: Any) -> Any:
        """Items put straight into this instance's inbox: the ends of coroutine handlers."""
        if not isinstance(message, CoroutineDone):
            raise TypeError(f"app gateway got an unexpected {type(message).__name__}")
        exc = message.future.exception() if not message.future.cancelled() else asyncio.CancelledError()
        if exc is not None:
            self._handler_failed(message.kind, message.handler, exc)
        left = self.running.pop(message.message_id) - 1
        if left:
            self.running[message.message_id] = left
        else:
            self.inbox.mark_handled(message.message_id)
        return None

    def _dispatch_inbound(self, msg: Incoming) -> None:
        if msg.message_id in self.running:
            return  # a second Incoming while its coroutine handlers still run: they will mark it
        dispatches = self.inbox.begin_dispatch(msg.message_id)
        if dispatches is None:
            self.ctx.log.emit("message_already_handled", message_id=msg.message_id.hex())
            return
        try:
            decoded = decode_message(msg.envelope)
        except ProtocolError as exc:
            self.ctx.log.emit("message_rejected", level="warning", actor=self.name, reason=str(exc))
            self.inbox.mark_handled(msg.message_id)
            return
        if dispatches > self.max_dispatches:
            self.ctx.log.emit(
                "message_poisoned",
                level="error",
                message_id=msg.message_id.hex(),
                kind=decoded.kind,
                sender=decoded.sender,
                dispatches=dispatches - 1,
            )
            self.inbox.mark_handled(msg.message_id)
            return
        if dispatches > 1:
            self.ctx.log.emit("message_redelivered", message_id=msg.message_id.hex(), dispatches=dispatches)
        message = InboundMessage.of(decoded, redelivered=dispatches > 1)
        coroutines = 0
        for sub in self.subscribers.for_kind(message.kind):
            try:
                if sub.loop is not None:
                    future = asyncio.run_coroutine_threadsafe(sub.handler(message), sub.loop)
                    future.add_done_callback(self._coroutine_done(msg.message_id, message.kind, sub.handler))
                    coroutines += 1
                else:
                    sub.handler(message)
            except Exception as exc:  # noqa: BLE001 - the application's bug: logged, the others still run
                self._handler_failed(message.kind, sub.handler, exc)
        if coroutines:
            self.running[msg.message_id] = coroutines
        else:
            self.inbox.mark_handled(msg.message_id)  # R5: nothing runs between the last return and this commit

    def _coroutine_done(self, message_id: bytes, kind: str, handler: Any) -> Any:
        ref = self.actor_ref

        def done(future: Future[Any]) -> None:
            # Runs on the handler's event loop.
            try:
                ref.tell(CoroutineDone(message_id, kind, handler, future))
            except pykka.ActorDeadError:
                # This instance has ended: the message stays unhandled and is dispatched
                # again (redelivered) when the retrier next starts.
                return

        return done

    def _handler_failed(self, kind: str, handler: Any, exc: BaseException) -> None:
        self.ctx.log.emit(
            "handler_failed",
            level="error",
            kind=kind,
            handler=getattr(handler, "__qualname__", repr(handler)),
            exc_type=type(exc).__name__,
            exc_message=str(exc),
            traceback="".join(traceback.format_exception(exc)),
        )
