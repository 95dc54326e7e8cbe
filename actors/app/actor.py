"""The application gateway actor: the one place application code runs inside the node.

It speaks the retrier's application protocol
(:mod:`villagemesh.actors.retrier.messages`): each message of an ``IncomingMany``
or ``Incoming`` (new, deduplicated) it dispatches to every subscriber of its
kind; ``MessagesDelivered`` and ``MessageFailed`` resolve delivery handles.

Dispatch is exactly once for handlers that return (the argument is in
:mod:`villagemesh.actors.core.ledger`). The gateway commits both marks itself,
in its own thread, on its own connection to the inbox file, rather than telling
the retrier and letting it commit later (a ``kill -9`` in between used to
dispatch several handled messages again)::

    Incoming ─► Inbox.begin_dispatch (commit) ─► handlers ─► Inbox.mark_handled (commit)

Every ``Incoming`` waiting in the mailbox is taken in one turn, and dispatched in
chunks: one commit counts the dispatch of every message of a chunk, their
handlers run one after another, one commit marks them handled (with their
outcome reports). A chunk holds as many messages as the handlers get through in
about :data:`DISPATCH_CHUNK_S` (measured as they run; one message until the
first has been timed), so fast handlers pay two commits per chunk instead of
two per message, and slow ones (a millisecond or more each) go one message per
chunk, as before batching. A ``kill -9`` mid-chunk redelivers, flagged, every
message of that chunk: those whose handlers had run and the rest (the flag says
"may have been seen before"; a dispatch without it is still always the first).
That is at most about ``DISPATCH_CHUNK_S`` of handler work, and exactly the one
message being handled when handlers are slow. Outcome reports arriving together
are marked in one commit too.

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
subscribers still run; the message is marked handled (it is not dispatched
again) and its sender is told ``handler_failed``. Letting it crash the
gateway would dispatch the same message again after the restart, forever.

Outcomes (honest delivery status; the wire form is in :mod:`.messages`). With
``outcomes_to`` set (the node sets its retrier), every dispatched message's
end goes back to its sender as an outcome report, a reliable envelope of its
own, stored in the same commit as the mark (so a kill after it loses no report):

============== ========================================== ===================================
status         when                                       logged / counted (GatewayCounters) here
============== ========================================== ===================================
handled        every handler returned                     (``message_handled`` at the sender)
unhandled      nobody subscribes to the kind              ``message_unhandled``, ``unhandled``
handler_failed a handler raised, its coroutine failed, a  ``handler_failed``, ``handler_failed``
               plain handler returned a coroutine outside
               any loop, the payload did not decode, or
               the message is poison
============== ========================================== ===================================

The first non-None value a handler returns is the reply (encoded by the
``codec``); a request reads it from the report. A plain handler that returns
a coroutine (``subscribe("DATA", lambda m: queue.put(m))`` with an
``asyncio.Queue``) has it run on the loop it subscribed from, or, subscribed
outside any loop, refused as a failed handler naming the fix.

At the sender, the gateway resolves delivery handles: with ``await_outcomes``
(the node's setting) an ack (in a ``MessagesDelivered``) only marks the handle
acked, and the outcome report ends it (DELIVERED, UNHANDLED,
HANDLER_FAILED); no report within ``outcome_timeout`` seconds of the ack ends
it UNCONFIRMED (the report could not reach the sender in time).
``MessageFailed`` ends it FAILED. Without
``await_outcomes`` the ack ends it DELIVERED (a harness without a peer gateway).

The gateway also answers :class:`~.messages.BridgeQuery` for the node's asyncio
face: it asks the registry or retrier (with a timeout) and sets the caller's
future on its loop (``loop.call_soon_threadsafe``).

Config: ``subscribers`` (Subscribers), ``handles`` (HandleTable), ``inbox``
(the retrier's SQLite file, required), ``synchronous`` (NORMAL or FULL),
``max_dispatches`` (default :data:`MAX_DISPATCHES`), ``node_id`` and
``outcomes_to`` (send outcome reports), ``await_outcomes``,
``outcome_timeout`` (default :data:`OUTCOME_TIMEOUT`), ``codec`` (a payload
codec, default bytes), ``counters`` (GatewayCounters, shared so they outlive
a restart), ``bridge`` (Bridge) with ``registry``/``retrier`` names
and ``tree`` (a callable answering the ``actors`` query).
Log events: ``handler_failed`` (kind, handler, exc_type, exc_message,
traceback), ``message_rejected`` (actor, reason), ``message_redelivered``
(message_id, dispatches), ``message_already_handled`` (message_id),
``message_poisoned`` (message_id, kind, sender, dispatches),
``message_unhandled`` (message_id, kind, sender), ``message_handled``
(message_id, peer_id, status, reason) when an outcome ends a handle,
``messages_handled`` (message_ids, peer_id, status) when a batch report ends many,
``outcome_unclaimed`` (message_id, status) for a report nobody waits for,
``outcome_undeliverable`` (message_id, reason), ``message_unconfirmed``
(message_id, timeout_s).
"""

from __future__ import annotations

import asyncio
import inspect
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pykka

from villagemesh.actors.app.messages import (
    MAX_REASON_CHARS,
    OUTCOME_KIND,
    OUTCOMES_KIND,
    OUTCOMES_PER_REPORT,
    REPORT_KINDS,
    BridgeQuery,
    CoroutineDone,
    HandledBatch,
    Outcome,
    OutcomeDue,
    OutcomeStatus,
)
from villagemesh.actors.app.payload import BytesCodec, PayloadCodec, payload_codec
from villagemesh.actors.app.state import (
    Bridge,
    DeliveryState,
    GatewayCounters,
    HandleTable,
    InboundMessage,
    Subscribers,
)
from villagemesh.actors.betanet.messages import GetBetanetStatus
from villagemesh.actors.bitchat.messages import GetBitchatStatus
from villagemesh.actors.core.base import Actor, ActorContext, Request
from villagemesh.actors.core.envelopes import decode
from villagemesh.actors.core.ids import new_id
from villagemesh.actors.core.ledger import Inbox
from villagemesh.actors.registry.messages import FindSuitablePeers, ListPeers
from villagemesh.actors.retrier.messages import (
    Deliver,
    GetRetrierStatus,
    Incoming,
    IncomingMany,
    MessageFailed,
    MessagesDelivered,
)
from villagemesh.errors import BusError, ConfigError, ProtocolError, SupervisionError, VillageMeshError
from villagemesh.protocols.envelope import Message, Priority, encode_message

__all__ = ["CHUNK_WALL_S", "DISPATCH_CHUNK_S", "MAX_DISPATCHES", "OUTCOME_TIMEOUT", "OUTCOME_TTL", "AppActor"]

MAX_DISPATCHES = 3
"""Dispatches of one message that may begin without finishing (the first and two redeliveries,
each ended by a death mid-handler) before it counts as poison and is set aside."""

DISPATCH_CHUNK_S = 0.001
"""Handler time one dispatch chunk may hold (one pair of commits): the most a kill mid-chunk redelivers."""

CHUNK_WALL_S = 0.005
"""Dispatch time one chunk may take, the gateway's own work with its handlers': how long the
chunk's first message waits for its mark and outcome report. With fast handlers it is this bound,
not DISPATCH_CHUNK_S, that sizes chunks (~100 messages at full speed instead of ~25 when the
gateway's own work counted as handler time, which cost the receiving gateway ~15 % more CPU a
message in per-chunk commits and reports: docs/benchmarks.md)."""

_EWMA = 0.25
"""Weight of the latest message's handler time in the running estimate that sizes chunks."""

OUTCOME_TIMEOUT = 60.0
"""Seconds a sender waits, after the ack, for the outcome report before the handle ends UNCONFIRMED."""

OUTCOME_TTL = 300.0
"""Seconds an outcome report lives: as long as an ack (a sender long gone needs none)."""
_PLAIN_SUCCESS = Outcome(OutcomeStatus.HANDLED)
"""Every handler returned, with no reply: reported in batches."""

BRIDGE_ASK_TIMEOUT = 5.0
"""Seconds the gateway waits for the registry or retrier on behalf of an asyncio caller."""


@dataclass(slots=True)
class _Run:
    """One dispatched message whose handlers have not all ended."""

    message: Message
    left: int = 0
    reply: Any = None
    failure: BaseException | None = None
    failed_handler: Any = field(default=None)


def _ewma(estimate: float | None, took: float) -> float:
    return took if estimate is None else estimate + _EWMA * (took - estimate)


class AppActor(Actor):
    """Config: see the module's docstring."""

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
        self.node_id: str | None = ctx.config.get("node_id")
        self.outcomes_to: str | None = ctx.config.get("outcomes_to")
        if self.outcomes_to is not None and not self.node_id:
            raise ConfigError("the app gateway sends outcome reports only with config['node_id'] (this node's id)")
        self.await_outcomes = bool(ctx.config.get("await_outcomes", False))
        self.outcome_timeout = ctx.config.get("outcome_timeout", OUTCOME_TIMEOUT)
        if isinstance(self.outcome_timeout, bool) or not isinstance(self.outcome_timeout, int | float):
            raise ConfigError(f"outcome_timeout must be seconds > 0, got {self.outcome_timeout!r}")
        if not self.outcome_timeout > 0:
            raise ConfigError(f"outcome_timeout must be seconds > 0, got {self.outcome_timeout!r}")
        self.codec: PayloadCodec = payload_codec(ctx.config.get("codec", BytesCodec()))
        self.bridge: Bridge | None = ctx.config.get("bridge")
        self.registry_name: str = ctx.config.get("registry", "registry")
        self.retrier_name: str = ctx.config.get("retrier", "retrier")
        self.counters: GatewayCounters = ctx.config.get("counters") or GatewayCounters()
        self.tree: Callable[[], Any] | None = ctx.config.get("tree")
        """Answers the ``actors`` query: the node's supervision tree (asked with a timeout)."""

    def on_start(self) -> None:
        self.inbox = Inbox(self.inbox_path, synchronous=self.synchronous)
        self.running: dict[bytes, _Run] = {}
        """Messages with coroutine handlers still running."""
        self.acked_at: dict[bytes, float] = {}
        """Acked sends waiting for their outcome report: when acked (monotonic), oldest first."""
        self.sweep_pending = False
        self.handler_s: float | None = None
        """Running estimate of one message's handler time (None until one has been timed)."""
        self.dispatch_s: float | None = None
        """Running estimate of one message's whole dispatch time, the gateway's own work included."""
        self.settling: list[tuple[bytes, Message, Outcome]] | None = None
        """Inside a dispatch chunk: the marks (with their outcomes) its one commit will hold."""
        self.reports_in: list[tuple[bytes, Message]] = []
        """Inside a dispatch chunk: outcome reports received, marked by the same commit."""
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
        """Every message waiting: each run of Incomings (an IncomingMany is a run) dispatched in chunks, the
        rest one by one, in order."""
        incoming: list[Incoming] = []
        for request in batch:
            if isinstance(request.msg, IncomingMany):
                incoming.extend(request.msg)
                continue
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
        elif isinstance(msg, IncomingMany):
            self._dispatch_many(list(msg))
        elif isinstance(msg, MessagesDelivered):
            self._delivered(msg)
        elif isinstance(msg, MessageFailed):
            self.handles.resolve(msg.message_id, False, msg.attempts, f"{msg.reason}: {msg.last_error}")
        elif isinstance(msg, OutcomeDue):
            self._outcomes_due()
        elif isinstance(msg, BridgeQuery):
            self._bridge_query(msg)
        else:
            raise TypeError(f"app gateway got an unexpected {type(msg).__name__}")
        return None

    def on_receive(self, message: Any) -> Any:
        """Items put straight into this instance's inbox: the ends of coroutine handlers."""
        if not isinstance(message, CoroutineDone):
            raise TypeError(f"app gateway got an unexpected {type(message).__name__}")
        run = self.running.get(message.message_id)
        if run is None:
            return None
        future = message.future
        if future.cancelled():
            self._failed(run, message.handler, asyncio.CancelledError("the coroutine handler was cancelled"))
        elif (exc := future.exception()) is not None:
            self._failed(run, message.handler, exc)
        elif run.reply is None:
            run.reply = future.result()
        run.left -= 1
        if run.left == 0:
            del self.running[message.message_id]
            self._conclude(message.message_id, run)
        return None

    def _delivered(self, msg: MessagesDelivered) -> None:
        """Acked sends: each handle ends delivered, or, when outcomes are awaited, is marked acked and
        waits for its outcome report."""
        handles = self.handles
        if not self.await_outcomes:
            for message_id, attempts, _ in msg:
                handles.resolve(message_id, True, attempts, None)
            return
        acked = [message_id for message_id, attempts, _ in msg if handles.acked(message_id, attempts)]
        if acked:
            now = time.monotonic()
            self.acked_at.update(dict.fromkeys(acked, now))
            self._sweep_soon()

    # -- waiting for outcome reports --------------------------------------------------------------

    def _sweep_soon(self) -> None:
        """One sweep timer (not one per message) ends the sends whose outcome is late."""
        if not self.sweep_pending:
            self.sweep_pending = True
            self.schedule(self.outcome_timeout / 4, OutcomeDue())

    def _outcomes_due(self) -> None:
        self.sweep_pending = False
        now = time.monotonic()
        while self.acked_at:
            message_id, at = next(iter(self.acked_at.items()))  # acked first = oldest
            if at + self.outcome_timeout > now:
                break
            del self.acked_at[message_id]
            handle = self.handles.get(message_id)
            if handle is None:
                continue  # its outcome came
            self.ctx.log.emit(
                "message_unconfirmed", level="warning", message_id=message_id.hex(), timeout_s=self.outcome_timeout
            )
            self.counters.unconfirmed += 1
            reason = f"acked, but no outcome report within {self.outcome_timeout} s"
            self.handles.resolve(message_id, DeliveryState.UNCONFIRMED, None, reason)
        # Forget the ended (their outcome came) so the table holds only the waiting.
        for message_id in [m for m in self.acked_at if self.handles.get(m) is None]:
            del self.acked_at[message_id]
        if self.acked_at:
            self.sweep_pending = True
            self.schedule(self.outcome_timeout / 4, OutcomeDue())

    # -- receiving ---------------------------------------------------------------------------

    def _chunk(self) -> int:
        """How many messages the next dispatch chunk takes: about DISPATCH_CHUNK_S of handler work,
        and CHUNK_WALL_S of dispatch time, whichever is fewer."""
        if self.handler_s is None or self.dispatch_s is None:
            return 1
        by_handlers = DISPATCH_CHUNK_S / max(self.handler_s, 1e-7)
        by_wall = CHUNK_WALL_S / max(self.dispatch_s, 1e-7)
        return max(1, min(self.batch_limit, int(min(by_handlers, by_wall))))

    def _dispatch_many(self, messages: list[Incoming]) -> None:
        """Dispatch ``messages`` in chunks: R3 for a chunk in one commit, its handlers, R5 in one commit."""
        at = 0
        while at < len(messages):
            chunk = messages[at : at + self._chunk()]
            at += len(chunk)
            begin = []
            for msg in chunk:
                if msg.message_id in self.running:
                    continue
                try:
                    if decode(msg.envelope).kind in REPORT_KINDS:
                        continue  # no handler runs: marked, never counted
                except ProtocolError:
                    continue  # rejected (and marked) by _dispatch_inbound
                begin.append(msg.message_id)
            counts = self.inbox.begin_dispatch_many(begin) if begin else {}  # R3: committed
            self.settling = []
            dispatched: set[bytes] = set()
            try:
                for msg in chunk:
                    if msg.message_id in dispatched:
                        # The same id twice in one chunk (a redispatch beside the first hand-over): its
                        # handlers ran for the first copy, and its mark commits with this chunk.
                        self.ctx.log.emit("message_already_handled", message_id=msg.message_id.hex())
                        continue
                    dispatched.add(msg.message_id)
                    started = time.perf_counter()
                    handlers_took = self._dispatch_inbound(msg, counts)
                    self.dispatch_s = _ewma(self.dispatch_s, time.perf_counter() - started)
                    self.handler_s = _ewma(self.handler_s, handlers_took)
            finally:
                self._settle_chunk()  # R5: nothing runs between the last return and this commit

    def _dispatch_inbound(self, msg: Incoming, begun: dict[bytes, int]) -> float:
        """Dispatch one message; the time its handlers took themselves (0 when none ran)."""
        if msg.message_id in self.running:
            return 0.0  # a second Incoming while its coroutine handlers still run: they will mark it
        try:
            decoded = decode(msg.envelope)
        except ProtocolError as exc:
            self.ctx.log.emit("message_rejected", level="warning", actor=self.name, reason=str(exc))
            self.inbox.mark_handled(msg.message_id)
            return 0.0
        if decoded.kind in REPORT_KINDS:
            # No handler runs: the chunk's commit marks it, no dispatch count.
            self.reports_in.append((msg.message_id, decoded))
            return 0.0
        dispatches = begun.get(msg.message_id)
        if dispatches is None:
            self.ctx.log.emit("message_already_handled", message_id=msg.message_id.hex())
            return 0.0
        run = _Run(decoded)
        if dispatches > self.max_dispatches:
            self.ctx.log.emit(
                "message_poisoned",
                level="error",
                message_id=msg.message_id.hex(),
                kind=decoded.kind,
                sender=decoded.sender,
                dispatches=dispatches - 1,
            )
            run.failure = _Poisoned(f"its handlers never finished in {dispatches - 1} dispatches: set aside")
            self._conclude(msg.message_id, run)
            return 0.0
        if dispatches > 1:
            self.ctx.log.emit("message_redelivered", message_id=msg.message_id.hex(), dispatches=dispatches)
        subscriptions = self.subscribers.for_kind(decoded.kind)
        if not subscriptions:
            self.counters.unhandled += 1
            self.ctx.log.emit(
                "message_unhandled",
                level="warning",
                message_id=msg.message_id.hex(),
                kind=decoded.kind,
                sender=decoded.sender,
            )
            self._settle(msg.message_id, decoded, Outcome(OutcomeStatus.UNHANDLED, decoded.kind))
            return 0.0
        try:
            value = self.codec.decode(decoded.payload)
        except Exception as exc:  # noqa: BLE001 - the sender's bytes or the application's codec: reported
            self._failed(run, self.codec.decode, exc)
            self._conclude(msg.message_id, run)
            return 0.0
        message = InboundMessage.of(decoded, redelivered=dispatches > 1, value=value)
        self.counters.dispatched += 1
        handlers_started = time.perf_counter()
        for sub in subscriptions:
            try:
                if sub.is_coroutine:
                    self._run_on(sub.loop, sub.handler(message), msg.message_id, sub.handler, run)
                    continue
                result = sub.handler(message)
                if inspect.isawaitable(result):
                    if sub.loop is None:
                        if inspect.iscoroutine(result):
                            result.close()  # never awaited, and said so here rather than by a RuntimeWarning
                        raise ConfigError(
                            f"handler {_name_of(sub.handler)} returned {type(result).__name__} but was subscribed "
                            "outside an event loop: make it `async def` and subscribe it from the loop that "
                            "should run it, or subscribe it from inside that loop"
                        )
                    self._run_on(sub.loop, result, msg.message_id, sub.handler, run)
                elif result is not None and run.reply is None:
                    run.reply = result
            except Exception as exc:  # noqa: BLE001 - the application's bug: logged, reported, the others still run
                self._failed(run, sub.handler, exc)
        took = time.perf_counter() - handlers_started
        if run.left:
            self.running[msg.message_id] = run
        else:
            self._conclude(msg.message_id, run)  # R5: nothing runs between the last return and the commit
        return took

    def _run_on(self, loop: Any, awaitable: Any, message_id: bytes, handler: Any, run: _Run) -> None:
        future = asyncio.run_coroutine_threadsafe(_awaited(awaitable), loop)
        future.add_done_callback(self._coroutine_done(message_id, getattr(run.message, "kind", ""), handler))
        run.left += 1

    def _conclude(self, message_id: bytes, run: _Run) -> None:
        """Commit the mark and the outcome report to the sender (one commit), then hand the report on."""
        if run.failure is not None:
            exc = run.failure
            outcome = Outcome(OutcomeStatus.HANDLER_FAILED, str(exc)[:MAX_REASON_CHARS], type(exc).__name__)
        elif run.reply is None:
            outcome = Outcome(OutcomeStatus.HANDLED)
        else:
            try:
                outcome = Outcome(OutcomeStatus.HANDLED, reply=self.codec.encode(run.reply))
            except Exception as exc:  # noqa: BLE001 - the application's codec or value: reported to the sender
                reason = f"the reply could not be encoded: {type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]
                outcome = Outcome(OutcomeStatus.HANDLED, reason, "ReplyNotEncoded")
        self._settle(message_id, run.message, outcome)

    def _settle(self, message_id: bytes, message: Message, outcome: Outcome) -> None:
        """R5: mark ``message_id`` handled; with outcomes on, its report is stored in the same commit.

        The report is an outbox row the retrier is then told to adopt (``Deliver(stored=True)``);
        if this process dies first, the restarted retrier finds the row and sends it.
        """
        if self.settling is not None:
            self.settling.append((message_id, message, outcome))  # committed with its chunk
            return
        if self.outcomes_to is None or message.recipient is None:
            self.inbox.mark_handled(message_id)  # no one to report to: a harness without a retrier, or a broadcast
            return
        report = self._report_for(message, outcome)
        envelope = encode_message(report)
        self.inbox.mark_handled_reporting(
            message_id, report.id, message.sender, report.priority, envelope, report.created_at, report.expires_at
        )
        self.counters.outcomes_sent += 1
        try:
            self.tell(self.outcomes_to, Deliver(envelope, stored=True))
        except BusError as exc:  # stored: the retrier sends it when it next starts
            self.ctx.log.emit("outcome_undeliverable", level="warning", message_id=message.id.hex(), reason=str(exc))

    def _settle_chunk(self) -> None:
        """One commit for a chunk: every mark, every outcome report to send, every report received;
        then the reports go to the retrier (one frame) and the received ones end their handles."""
        settling, self.settling = self.settling or [], None
        received, self.reports_in = self.reports_in, []
        if not settling and not received:
            return
        reports = self._reports_for(settling) if self.outcomes_to is not None else []
        rows = [
            (r.id, r.recipient or "", int(r.priority), encode_message(r), r.created_at, r.expires_at) for r in reports
        ]
        ids = [m for m, _, _ in settling] + [m for m, _ in received]
        marked = self.inbox.settle_many(ids, rows)
        to = self.outcomes_to
        for report, row in zip(reports, rows, strict=True):
            if to is None:  # no reports were made without a retrier to send them (see `reports` above)
                break
            self.counters.outcomes_sent += 1
            try:
                self.tell(to, Deliver(row[3], stored=True))
            except BusError as exc:  # stored: the retrier sends it when it next starts
                reason = str(exc)
                self.ctx.log.emit("outcome_undeliverable", level="warning", message_id=report.id.hex(), reason=reason)
        for message_id, report in received:
            if message_id in marked:  # not marked: a second Incoming of it
                self._outcome_received(report)

    def _reports_for(self, settling: list[tuple[bytes, Message, Outcome]]) -> list[Message]:
        """The reports of one chunk: plain successes batched per sender and priority, the rest one each."""
        assert self.node_id is not None
        reports: list[Message] = []
        plain: dict[tuple[str, Priority], list[bytes]] = {}
        for _, message, outcome in settling:
            if message.recipient is None:
                continue  # a broadcast: nobody waits for its outcome
            if outcome == _PLAIN_SUCCESS:
                plain.setdefault((message.sender, message.priority), []).append(message.id)
            else:
                reports.append(self._report_for(message, outcome))
        now = time.time()
        for (sender, priority), ids in plain.items():
            for at in range(0, len(ids), OUTCOMES_PER_REPORT):
                payload = HandledBatch(tuple(ids[at : at + OUTCOMES_PER_REPORT])).encode()
                report = Message(
                    new_id(), OUTCOMES_KIND, self.node_id, sender, priority, now, OUTCOME_TTL, None, payload
                )
                reports.append(report)
        return reports

    def _report_for(self, message: Message, outcome: Outcome) -> Message:
        assert self.node_id is not None
        now = time.time()
        try:
            payload = outcome.encode()
            return Message(
                new_id(), OUTCOME_KIND, self.node_id, message.sender, message.priority, now,
                OUTCOME_TTL, message.id, payload,
            )  # fmt: skip
        except ProtocolError as exc:  # the reply is too big for one envelope
            reason = f"the reply does not fit an envelope: {exc}"[:MAX_REASON_CHARS]
            failed = Outcome(OutcomeStatus.HANDLER_FAILED, reason, "ReplyTooLarge")
            return Message(
                new_id(), OUTCOME_KIND, self.node_id, message.sender, message.priority, now,
                OUTCOME_TTL, message.id, failed.encode(),
            )  # fmt: skip

    def _outcome_received(self, report: Message) -> None:
        if report.kind == OUTCOMES_KIND:
            self._batch_received(report)
            return
        if report.correlation_id is None:
            self.ctx.log.emit("message_rejected", level="warning", actor=self.name, reason="outcome without an id")
            return
        try:
            outcome = Outcome.decode(report.payload)
        except ProtocolError as exc:
            self.ctx.log.emit("message_rejected", level="warning", actor=self.name, reason=str(exc))
            return
        state = _STATES[outcome.status]
        mid = report.correlation_id.hex()
        self.counters.outcomes_received += 1
        if self.handles.get(report.correlation_id) is None:
            self.counters.outcomes_unclaimed += 1
            self.ctx.log.emit("outcome_unclaimed", message_id=mid, status=outcome.status.value)
            return
        # Logged before the handle ends, so whoever waits on the handle finds the line written.
        self.ctx.log.emit(
            "message_handled",
            level="info" if state is DeliveryState.DELIVERED else "warning",
            message_id=mid,
            peer_id=report.sender,
            status=outcome.status.value,
            reason=outcome.reason,
        )
        self.handles.resolve(
            report.correlation_id, state, None, outcome.reason, remote_type=outcome.exc_type, reply=outcome.reply
        )

    def _batch_received(self, report: Message) -> None:
        try:
            batch = HandledBatch.decode(report.payload)
        except ProtocolError as exc:
            self.ctx.log.emit("message_rejected", level="warning", actor=self.name, reason=str(exc))
            return
        claimed = []
        for message_id in batch.ids:
            self.counters.outcomes_received += 1
            if self.handles.get(message_id) is None:
                self.counters.outcomes_unclaimed += 1
                self.ctx.log.emit("outcome_unclaimed", message_id=message_id.hex(), status="handled")
            else:
                claimed.append(message_id)
        if not claimed:
            return
        # One line for the batch, logged before the handles end (whoever waits on one finds it written).
        self.ctx.log.emit(
            "messages_handled", message_ids=[m.hex() for m in claimed], peer_id=report.sender, status="handled"
        )
        for message_id in claimed:
            self.handles.resolve(message_id, DeliveryState.DELIVERED, None, None)

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

    def _failed(self, run: _Run, handler: Any, exc: BaseException) -> None:
        self.counters.handler_failed += 1
        if run.failure is None:
            run.failure = exc
        self.ctx.log.emit(
            "handler_failed",
            level="error",
            kind=run.message.kind,
            handler=_name_of(handler),
            exc_type=type(exc).__name__,
            exc_message=str(exc),
            traceback="".join(traceback.format_exception(exc)),
        )

    # -- the asyncio bridge ---------------------------------------------------------------------

    def _bridge_query(self, msg: BridgeQuery) -> None:
        if self.bridge is None:
            raise ConfigError("the app gateway got a BridgeQuery without config['bridge']")
        queries: dict[str, tuple[str, object]] = {
            "peers": (self.registry_name, ListPeers()),
            "suitable_peers": (self.registry_name, FindSuitablePeers(msg.argument)),
            "retrier_status": (self.retrier_name, GetRetrierStatus()),
            "betanet_status": ("betanet", GetBetanetStatus()),
            "bitchat_status": ("bitchat", GetBitchatStatus()),
        }
        if msg.query == "actors" and self.tree is not None:
            try:
                self.bridge.answer(msg.token, self.tree())
            except (VillageMeshError, pykka.Timeout, pykka.ActorDeadError) as exc:
                self.bridge.answer(msg.token, error=SupervisionError(f"the actor tree did not answer: {exc!r}"))
            return
        if msg.query not in queries:
            self.bridge.answer(msg.token, error=ConfigError(f"unknown bridge query {msg.query!r}"))
            return
        to, question = queries[msg.query]
        try:
            answer = self.ask(to, question, timeout=BRIDGE_ASK_TIMEOUT)
        except VillageMeshError as exc:
            self.bridge.answer(msg.token, error=exc)
            return
        self.bridge.answer(msg.token, answer)


class _Poisoned(Exception):
    """A message whose handlers never finished (reported to its sender as a failed handler)."""


_STATES = {
    OutcomeStatus.HANDLED: DeliveryState.DELIVERED,
    OutcomeStatus.UNHANDLED: DeliveryState.UNHANDLED,
    OutcomeStatus.HANDLER_FAILED: DeliveryState.HANDLER_FAILED,
}


def _name_of(handler: Any) -> str:
    return str(getattr(handler, "__qualname__", repr(handler)))


async def _awaited(awaitable: Any) -> Any:
    return await awaitable
