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

Every ``Incoming`` waiting in the mailbox is taken in one turn, and dispatched in
chunks: one commit counts the dispatch of every message of a chunk, their
handlers run one after another, one commit marks them handled. A chunk holds
as many messages as the handlers get through in about :data:`DISPATCH_CHUNK_S`
(measured as they run; one message until the first has been timed), so fast
handlers pay two commits per chunk instead of two per message, and slow ones
(a millisecond or more each) go one message per chunk, as before batching. A
``kill -9`` mid-chunk redelivers, flagged, every message of that chunk: those
whose handlers had run and the rest (a flag says "may have been seen before";
a dispatch without it is still always the first). That is at most about
``DISPATCH_CHUNK_S`` of handler work, and exactly the one message being handled
when handlers are slow.

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
import time
import traceback
from concurrent.futures import Future
from typing import Any

import pykka

from villagemesh.actors.app.messages import CoroutineDone
from villagemesh.actors.app.state import HandleTable, InboundMessage, Subscribers
from villagemesh.actors.core.base import Actor, ActorContext, Request
from villagemesh.actors.core.envelopes import decode
from villagemesh.actors.core.ledger import Inbox
from villagemesh.actors.retrier.messages import Incoming, MessageDelivered, MessageFailed
from villagemesh.errors import ConfigError, ProtocolError

__all__ = ["DISPATCH_CHUNK_S", "MAX_DISPATCHES", "AppActor"]

MAX_DISPATCHES = 3
"""Dispatches of one message that may begin without finishing (the first and two redeliveries,
each ended by a death mid-handler) before it counts as poison and is set aside."""

DISPATCH_CHUNK_S = 0.001
"""Handler time one dispatch chunk may hold (one pair of commits): the most a kill mid-chunk redelivers."""

_EWMA = 0.25
"""Weight of the latest message's handler time in the running estimate that sizes chunks."""


class AppActor(Actor):
    """Config: ``subscribers`` (Subscribers), ``handles`` (HandleTable), ``inbox`` (path), ``synchronous``."""

    batch_limit = 1024

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
        self.handler_s: float | None = None
        """Running estimate of one message's handler time (None until one has been timed)."""
        # A previous instance (or process) died while these ran: dispatch them again now, flagged.
        # (The retrier re-sends every unhandled message when it starts; those Incomings find
        # these handled.)
        unfinished = []
        for message_id in self.inbox.unfinished():
            envelope = self.inbox.payload(message_id)
            if envelope is not None:
                unfinished.append(Incoming(message_id, envelope))
        self._dispatch_many(unfinished)

    def on_stop(self) -> None:
        self.inbox.close()

    def handle_batch(self, batch: list[Request]) -> None:
        """Every message waiting: each run of Incomings dispatched in chunks, the rest one by one, in order."""
        incoming: list[Incoming] = []
        for request in batch:
            if isinstance(request.msg, Incoming):
                incoming.append(request.msg)
                continue
            if incoming:
                self._dispatch_many(incoming)
                incoming = []
            answer = self.handle(request.msg)
            if request.token is not None:
                request.token.reply(answer)
        if incoming:
            self._dispatch_many(incoming)

    def handle(self, msg: Any) -> Any:
        if isinstance(msg, Incoming):
            self._dispatch_many([msg])
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

    def _chunk(self) -> int:
        """How many messages the next dispatch chunk takes: about DISPATCH_CHUNK_S of handler work."""
        if self.handler_s is None:
            return 1
        return max(1, min(self.batch_limit, int(DISPATCH_CHUNK_S / max(self.handler_s, 1e-7))))

    def _dispatch_many(self, messages: list[Incoming]) -> None:
        """Dispatch ``messages`` in chunks: R3 for a chunk in one commit, its handlers, R5 in one commit."""
        at = 0
        while at < len(messages):
            taken = messages[at : at + self._chunk()]
            at += len(taken)
            chunk = [m for m in taken if m.message_id not in self.running]
            if not chunk:
                continue  # second Incomings while their coroutine handlers still run: they will mark them
            counts = self.inbox.begin_dispatch_many([m.message_id for m in chunk])  # R3: committed
            handled: list[bytes] = []
            for msg in chunk:
                dispatches = counts.get(msg.message_id)
                if dispatches is None:
                    self.ctx.log.emit("message_already_handled", message_id=msg.message_id.hex())
                    continue
                started = time.perf_counter()
                if self._run_handlers(msg, dispatches):
                    handled.append(msg.message_id)
                took = time.perf_counter() - started
                self.handler_s = took if self.handler_s is None else self.handler_s + _EWMA * (took - self.handler_s)
            if handled:
                self.inbox.mark_handled_many(handled)  # R5: nothing runs between the last return and this commit

    def _run_handlers(self, msg: Incoming, dispatches: int) -> bool:
        """Call every subscriber of a message whose dispatch began; True when it is handled now, False
        while coroutine handlers of it still run (their completions mark it)."""
        try:
            decoded = decode(msg.envelope)
        except ProtocolError as exc:
            self.ctx.log.emit("message_rejected", level="warning", actor=self.name, reason=str(exc))
            return True
        if dispatches > self.max_dispatches:
            self.ctx.log.emit(
                "message_poisoned",
                level="error",
                message_id=msg.message_id.hex(),
                kind=decoded.kind,
                sender=decoded.sender,
                dispatches=dispatches - 1,
            )
            return True
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
            return False
        return True

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
