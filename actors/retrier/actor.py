"""The delivery retrier actor: a thin shell around :mod:`.state` (decisions) and :mod:`.store` (the files).

Sending::

    app ──Deliver(envelope)──► step(Enqueue) ─► Outbox.put (commit: the row and its first Send)─┐
    transport ──TransmitResult──► step(AttemptResult) ──────────────────────────────────────────┤
    transport ──Received(ACK)───► step(AckReceived) ────────────────────────────────────────────┤
    registry ──PeerRoutes───────► step(Routes) ─────────────────────────────────────────────────┤
    timer ──_Wake───────────────► step(Tick) ───────────────────────────────────────────────────┤
                                                                                                ▼
        decisions ─► Outbox.apply (one commit) ─► Send: TransmitMany to the transport actor
                                                  Delivered: one MessagesDelivered a round to report_to, log
                                                  Failed: MessageFailed to report_to, log
                                                  NextWakeup: one timer

Receiving (the order is the exactly-once argument of :mod:`.store`)::

    transport ──ReceivedMany──► decode ─► Inbox.accept (commit) ─► ack ─► deliver_to: IncomingMany
    the node's app gateway: Inbox.begin_dispatch (commit) ─► handlers ─► Inbox.mark_handled (commit)
    any other deliver_to ──Handled(id)──► Inbox.mark_handled (commit)

The node's gateway commits its marks itself, on its own connection to the same
file (:mod:`villagemesh.actors.app.actor`): a ``Handled`` told to the retrier
would leave a window, between the handler's return and the retrier's commit,
in which a ``kill -9`` makes already handled messages run again, unflagged.

Every decision is committed to the outbox *before* it is acted on, so a kill
at any instant leaves the file describing at least what was done (a new
message's row is stored with its first attempt already counted: one commit,
one SQLite statement, per ``Deliver``); on start the
actor replays the outbox into a fresh state and re-dispatches every accepted
but unhandled inbox entry. The clock is read here (wall time, since TTLs come
from envelopes made on other nodes) and passed to the pure state as ``now``.

A ``Transmit`` that cannot even be handed to its transport actor (not running,
mailbox full) is a retryable failure of that attempt: the next transport is
tried at once. ``TransportDown`` (the node tells it when a transport's actor
crashes or stops) fails that transport's attempts in flight the same way, at
once, instead of at their ack deadline. An envelope addressed to this node
itself is refused.

Config (``ctx.config``): ``path`` (SQLite file for outbox and inbox, required),
``node_id`` (this node, required), ``mode`` (network mode, default hybrid),
``deliver_to`` / ``report_to`` (bus names, optional), ``transfer_to`` (bus name, optional: envelopes
of kind ``villagemesh.transfer`` go there instead of ``deliver_to``, which answers ``Handled``), ``registry`` (bus name
told ``ListRoutes(reply_to=<retrier>)`` at start, default ``registry``; until
its answer arrives, restored messages wait parked, spending no attempt), ``max_attempts``,
``backoff_base``, ``backoff_max``, ``jitter`` (see :class:`.policy.RetryPolicy`),
``ack_timeout``, ``max_in_flight``, ``route_timeout`` (see :class:`.state.RetrierState`),
``synchronous`` (NORMAL or FULL, see :mod:`villagemesh.actors.core.storage`), ``bridge`` (the node's
:class:`~villagemesh.actors.app.state.Bridge`: a ``DeliverMany`` with an ``answer_token`` is answered
through it once stored; without one such a message is a :class:`ConfigError`, nothing stored).

Log events: ``messages_delivered`` (count, message_ids, attempts, transports: one event per
round of decisions, its lists in the same order),
``delivery_failed`` (message_id, attempts, last_error, reason),
``envelope_rejected`` (transport, reason), ``ack_unroutable`` (message_id,
peer_id), ``dispatch_failed`` (message_id, reason), ``retrier_restored``
(pending, unhandled), ``routes_loaded`` (peers, routable) when the registry's
answer to the start-up ``ListRoutes`` arrives.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from villagemesh.actors.core.base import Actor, ActorContext, Request, TimerHandle
from villagemesh.actors.core.bus import Sender
from villagemesh.actors.core.envelopes import decode
from villagemesh.actors.core.ids import new_id
from villagemesh.actors.core.ledger import Inbox
from villagemesh.actors.core.transport import (
    REPLY_ADDRESS,
    TRANSPORT_NAMES,
    Received,
    ReceivedMany,
    TransmitMany,
    TransmitResult,
)
from villagemesh.actors.registry.messages import ListRoutes, PeerRoutes, RoutesList
from villagemesh.errors import BusError, ConfigError, LocalProtocolError, ProtocolError
from villagemesh.protocols.envelope import Message, Priority, encode_message
from villagemesh.protocols.transfer import CHUNK_KIND, TRANSFER_KIND

from .messages import (
    ACK_IDS_MAX,
    ACK_KIND,
    ACK_TTL,
    Deliver,
    DeliverMany,
    DeliverManyReply,
    DeliverReply,
    GetRetrierStatus,
    Handled,
    Incoming,
    IncomingMany,
    MessageFailed,
    MessagesDelivered,
    RetrierStarted,
    RetrierStatus,
    TransportDown,
    ack_ids,
)
from .modes import NetworkMode, next_transport
from .policy import RetryPolicy
from .state import (
    DEFAULT_ACK_TIMEOUT,
    AckReceived,
    AttemptResult,
    Decision,
    Delivered,
    Enqueue,
    Event,
    Failed,
    NextWakeup,
    Phase,
    RetrierState,
    Routes,
    Send,
    Tick,
    TransportLost,
)
from .store import Outbox

__all__ = ["RetrierActor", "mark_handled", "retrier_status", "send_envelope", "send_envelopes"]

REDISPATCH_EVERY = 1.0
"""Seconds between retries of an Incoming the application's mailbox refused."""


class _Wake:
    """Timer: the state asked for a Tick."""


REPLY_CAPABLE = frozenset({"websocket", "betanet", "bitchat"})
"""Transports that can answer without a route of their own (``REPLY_ADDRESS``): on the connection the
peer opened (websocket), on the reply block its message carried (betanet), to the BitChat peer id its
envelopes came from (bitchat)."""

BATCH_ACKS = frozenset({"websocket", "libp2p"})
"""Transports on which one ack envelope acknowledges every message of a turn from one peer (websocket:
back on the connection they came in on; libp2p: on the peer's route, one envelope for a window of a
transfer's chunks instead of one each). Elsewhere each message gets its own ack: betanet answers each on
the reply block that message carried, which is used once; a BitChat packet is small."""

HANDOFF_TIMEOUT = 0.1
"""Seconds the retrier waits for room in a transport's mailbox before that attempt fails."""

BATCH_LIMIT = 1024
"""Messages one turn of the retrier takes from its mailbox at most (all that wait, up to this)."""

HANDOFF_BYTES = 1 << 20
"""Envelope bytes one frame of Transmits to a transport carries at most (a bound on one bus frame)."""

_RUNS: dict[type, str] = {
    Deliver: "deliver",
    DeliverMany: "deliver",
    Received: "received",
    ReceivedMany: "received",
    Handled: "handled",
}
"""Message types a batch turn handles together, consecutive ones as one run (one commit)."""

_Outgoing = tuple[bytes, str, str, bytes, Send | None]
"""A Transmit queued for this turn's hand-over: message id, peer, address, envelope, and the
attempt it carries out (None: an ack)."""


def _received(msg: Received | ReceivedMany) -> Iterable[Received]:
    return msg if isinstance(msg, ReceivedMany) else (msg,)


class _Redispatch:
    """Timer: try again to hand refused Incomings to the application."""


class _SweepHeld:
    """Timer: forget chunks held longer than the ack timeout (see :meth:`RetrierActor._sweep_held`)."""


class RetrierActor(Actor):
    """Delivers envelopes reliably and exactly once, across transports, crashes and restarts."""

    batch_limit = BATCH_LIMIT

    def __init__(self, ctx: ActorContext) -> None:
        super().__init__(ctx)
        cfg = dict(ctx.config)
        for key in ("path", "node_id"):
            if not isinstance(cfg.get(key), str) or not cfg[key]:
                raise ConfigError(f"the retrier needs config[{key!r}] (a non-empty str), got {cfg.get(key)!r}")
        self.path: str = cfg["path"]
        self.node_id: str = cfg["node_id"]
        self.mode = NetworkMode.parse(cfg.get("mode", "hybrid"))
        self.deliver_to: str | None = cfg.get("deliver_to") or None
        self.report_to: str | None = cfg.get("report_to") or None
        self.transfer_to: str | None = cfg.get("transfer_to") or None
        self.registry: str | None = cfg.get("registry", "registry") or None
        self.synchronous = str(cfg.get("synchronous", "NORMAL"))
        self.bridge: Any = cfg.get("bridge")
        policy_keys = ("max_attempts", "backoff_base", "backoff_max", "jitter")
        self.policy = RetryPolicy(**{k: cfg[k] for k in policy_keys if k in cfg})
        state_keys = ("ack_timeout", "max_in_flight", "route_timeout")
        self.state_settings = {k: cfg[k] for k in state_keys if k in cfg}
        RetrierState(self.policy, self.mode, **self.state_settings)  # validate now, in the supervisor's thread

    # -- lifecycle (in the actor's thread) -----------------------------------------------------------

    def on_start(self) -> None:
        self.state = RetrierState(self.policy, self.mode, **self.state_settings)
        self.outbox = Outbox(self.path, synchronous=self.synchronous)
        self.inbox = Inbox(self.path, synchronous=self.synchronous)
        self.routes: dict[str, dict[str, tuple[str, ...]]] = {}
        self.wake: TimerHandle | None = None
        self.wake_at: float | None = None
        self.undispatched: set[bytes] = set()
        self.received = 0
        self.duplicates = 0
        self.delivered: list[Delivered] = []
        """Deliveries of this round not yet logged."""
        self.reports: list[Delivered] = []
        """Deliveries of this round not yet reported to ``report_to`` (not a transfer's chunks)."""
        self.outgoing: dict[str, list[_Outgoing]] = {}
        self.volatile: dict[bytes, bytes] = {}
        """Envelopes of transfer chunks being sent (kind ``CHUNK_KIND``): in memory only, never in the outbox."""
        self.chunks_held: dict[bytes, tuple[str, str, float]] = {}
        """Chunks received and handed to ``transfer_to``, not yet Handled: (sender, transport) to ack them on,
        and when (monotonic) they were handed over; swept after ``ack_timeout`` (:meth:`_sweep_held`)."""
        self.sweeping = False
        """A :class:`_SweepHeld` timer is set."""
        self._load_routes()
        now = time.time()
        pending = self.outbox.pending()
        # What was in flight goes again at once (with attempts to spare): its ack can no
        # longer arrive at this instance, and the receiver deduplicates the second copy.
        spare = self.policy.max_attempts
        self._step([row.to_enqueue(now, resend_now=row.in_flight and row.attempts < spare) for row in pending])
        unhandled = self.inbox.unhandled()
        for message_id in unhandled:
            self._hand_to_app(message_id)
        self.ctx.log.emit("retrier_restored", pending=len(pending), unhandled=len(unhandled))
        if self.transfer_to is not None:
            try:
                self.tell(self.transfer_to, RetrierStarted())
            except BusError as exc:  # the transfer actor is restarting too: its start offers again anyway
                self.ctx.log.emit("dispatch_failed", level="warning", message_id="", reason=str(exc))

    def on_stop(self) -> None:
        self.outbox.close()
        self.inbox.close()

    def _load_routes(self) -> None:
        """Ask the registry for every route without blocking: its RoutesList arrives as a message."""
        if self.registry is None:
            return
        try:
            self.tell(self.registry, ListRoutes(reply_to=self.name))
        except BusError as exc:
            # Restored messages stay parked (no attempt spent) until routes arrive by PeerRoutes.
            self.ctx.log.emit("routes_unavailable", level="warning", registry=self.registry, reason=str(exc))

    # -- messages ----------------------------------------------------------------------------------------

    def handle_batch(self, batch: list[Request]) -> None:
        """Every message waiting, in order; consecutive runs of Deliver, Received and Handled messages
        each as one run: one commit for the run, then its askers are answered."""
        run: list[Request] = []
        kind: str | None = None
        for request in batch:
            this = _RUNS.get(type(request.msg))
            if this == "deliver" and getattr(request.msg, "stored", False):
                this = "adopt"  # rows someone else stored: taken into the state together
            if run and this != kind:
                self._run(kind, run)
                run = []
            if this is None:
                answer = self.handle(request.msg)
                if request.token is not None:
                    request.token.reply(answer)
                continue
            kind = this
            run.append(request)
        if run:
            self._run(kind, run)

    def _run(self, kind: str | None, run: list[Request]) -> None:
        if kind == "deliver":
            for request, answer in zip(run, self._deliver_many([r.msg for r in run]), strict=True):
                if request.token is not None:
                    request.token.reply(answer)
            return
        if kind == "adopt":
            self._adopt_many([r.msg.envelope for r in run])
        elif kind == "received":
            self._received_many([r for request in run for r in _received(request.msg)])
        else:
            self._handled([r.msg.message_id for r in run])
        for request in run:
            if request.token is not None:
                request.token.reply(None)

    def handle(self, msg: Any) -> Any:
        """Dispatch one message (the protocol is in :mod:`.messages`)."""
        if isinstance(msg, Deliver) and msg.stored:
            self._adopt(msg.envelope)
            return None
        if isinstance(msg, Deliver | DeliverMany):
            return self._deliver_many([msg])[0]
        if isinstance(msg, TransportDown):
            self._step([TransportLost(msg.transport, time.time())])
            return None
        if isinstance(msg, TransmitResult):
            if msg.ok:
                return None  # not asked for (report_success=False); the state would wait for the ack anyway
            attempt = self._attempt_of(msg.message_id, msg.transport)
            error = msg.error or "failed"
            self._step([AttemptResult(msg.message_id, attempt, msg.transport, error, time.time(), msg.retryable)])
        elif isinstance(msg, Received | ReceivedMany):
            self._received_many(list(_received(msg)))
        elif isinstance(msg, Handled):
            self._handled([msg.message_id])
        elif isinstance(msg, PeerRoutes):
            self._set_routes(msg)
        elif isinstance(msg, RoutesList):
            for routes in msg.routes:
                self._set_routes(routes)
            self.ctx.log.emit("routes_loaded", peers=len(msg.routes), routable=len(self.routes))
        elif isinstance(msg, _Wake):
            # Never tick before the asked-for instant (the timer runs on the monotonic clock,
            # TTLs on the wall clock): what was due then is due now.
            now = max(time.time(), self.wake_at or 0.0)
            self.wake = self.wake_at = None
            self._step([Tick(now)])
        elif isinstance(msg, _SweepHeld):
            self.sweeping = False
            self._sweep_held(time.monotonic())
        elif isinstance(msg, _Redispatch):
            for message_id in list(self.undispatched):
                self._hand_to_app(message_id)
        elif isinstance(msg, GetRetrierStatus):
            c = self.state.counters
            return RetrierStatus(
                len(self.state),
                self.state.in_flight,
                c.sent,
                c.delivered,
                c.failed,
                c.retried,
                self.received,
                self.duplicates,
                len(self.inbox.unhandled()),
                self._pending_by_priority(),
                len(self.state.unreachable()),
                self.state.held,
                c.probes,
                len(self.chunks_held),
            )
        else:
            raise TypeError(f"retrier got an unexpected {type(msg).__name__}")
        return None

    def _pending_by_priority(self) -> tuple[int, ...]:
        counts = [0] * len(Priority)
        for view in self.state.pending():
            counts[view.priority] += 1
        return tuple(counts)

    def _attempt_of(self, message_id: bytes, transport: str) -> int:
        """The attempt a TransmitResult answers: the one in flight on that transport (0: none, ignored)."""
        view = self.state.view(message_id)
        if view is None or view.phase is not Phase.IN_FLIGHT or view.transport != transport:
            return 0  # an ack's result, or a late one for an attempt already settled
        return view.attempts

    # -- sending -----------------------------------------------------------------------------------------

    def _deliver_many(self, requests: list[Deliver | DeliverMany]) -> list[DeliverReply | DeliverManyReply]:
        """Admit every envelope of ``requests``, store the new ones in one commit, then send them.

        The group commit: the rows (each with its first attempt counted, S1 and S2 of the
        store's argument) and the state's other decisions of the turn are one transaction,
        committed before any answer or any Transmit.
        """
        tokens = [r.answer_token for r in requests if isinstance(r, DeliverMany) and r.answer_token]
        if tokens and self.bridge is None:
            raise ConfigError(f"DeliverMany answer_token {tokens[0]} but no config['bridge'] to answer it through")
        now = time.time()
        admitted: list[tuple[Message, bytes]] = []
        seen: set[bytes] = set()
        answers: list[DeliverReply | DeliverManyReply] = []
        for request in requests:
            if isinstance(request, Deliver):
                answers.append(self._admit(request.envelope, admitted, seen))
                continue
            replies = [self._admit(envelope, admitted, seen) for envelope in request.envelopes]
            answers.append(DeliverManyReply(tuple(r.message_id for r in replies), tuple(r.error for r in replies)))
        # The state decides first (pure, in memory), so that each row is stored with its first
        # attempt already counted.
        decisions = self.state.step_many(
            [Enqueue(m.id, m.recipient, m.priority, m.expires_at, now) for m, _ in admitted if m.recipient]
        )
        envelopes = {m.id: envelope for m, envelope in admitted}
        first: dict[bytes, Send] = {}
        for d in decisions:
            if isinstance(d, Send) and d.message_id in envelopes and d.message_id not in first:
                first[d.message_id] = d
        stored = {id(send): envelopes[message_id] for message_id, send in first.items()}
        rows = []
        for m, envelope in admitted:
            if m.kind == CHUNK_KIND:
                self.volatile[m.id] = envelope  # a transfer's chunk: held here until acked or failed
            elif m.recipient:  # always: a broadcast is refused in _admit
                rows.append((m.id, m.recipient, m.priority, envelope, m.created_at, m.expires_at, first.get(m.id)))
        rest = self._durable([d for d in decisions if id(d) not in stored])
        if rows:
            self.outbox.put_batch(rows, rest)
        elif rest:
            self.outbox.apply(rest)
        queue: deque[Event] = deque()
        for d in decisions:
            failure = self._carry_out(d, stored.get(id(d)))
            if failure is not None:
                queue.append(failure)
        self._step(list(queue))
        if tokens:  # stored (committed above): the asyncio senders waiting for it return
            for request, answer in zip(requests, answers, strict=True):
                if isinstance(request, DeliverMany) and request.answer_token:
                    self.bridge.answer(request.answer_token, answer)
        return answers

    def _admit(self, envelope: bytes, admitted: list[tuple[Message, bytes]], seen: set[bytes]) -> DeliverReply:
        """Check one envelope; a new message goes to ``admitted`` (an id already pending, or twice in
        ``admitted``, is answered as not new)."""
        try:
            message = decode(envelope)
        except ProtocolError as exc:
            return DeliverReply(None, False, f"not a valid envelope: {exc}")
        if message.recipient is None:
            return DeliverReply(message.id, False, "a broadcast has no single recipient to acknowledge it")
        if message.recipient == self.node_id:
            return DeliverReply(message.id, False, f"addressed to this node itself ({self.node_id})")
        if message.id in self.state or message.id in seen:
            return DeliverReply(message.id, False, None)  # already pending: stored, and in the state
        seen.add(message.id)
        admitted.append((message, envelope))
        return DeliverReply(message.id, True, None)

    def _adopt_many(self, envelopes: list[bytes]) -> None:
        """:meth:`_adopt` for several rows: one pass of the state, one commit of its decisions."""
        now = time.time()
        events: list[Event] = []
        seen: set[bytes] = set()
        for envelope in envelopes:
            message = decode(envelope)  # stored by this node's own gateway: a bad one is a bug
            if message.id in self.state or message.id in seen or message.recipient is None:
                continue
            seen.add(message.id)
            events.append(Enqueue(message.id, message.recipient, message.priority, message.expires_at, now))
        self._step(events)

    def _adopt(self, envelope: bytes) -> None:
        """Take a message someone else stored in the outbox into the state (a replay of one row)."""
        self._adopt_many([envelope])

    def _step(self, events: list[Event]) -> None:
        """Step the state through ``events`` and carry out its decisions (persisted first, in one commit
        per round), then hand this turn's Transmits to their transports; attempts that fail at once
        come back as events for another round."""
        queue: deque[Event] = deque(events)
        while True:
            while queue:
                decisions = self.state.step_many(list(queue))
                queue.clear()
                self.outbox.apply(self._durable(decisions))
                for d in decisions:
                    failure = self._carry_out(d, None)
                    if failure is not None:
                        queue.append(failure)
            queue.extend(self._flush_transmits())
            if not queue:
                self._log_delivered()
                return

    def _durable(self, decisions: list[Decision]) -> list[Decision]:
        """The decisions the outbox records: not those about chunks, which are in memory only."""
        volatile = self.volatile
        if not volatile:
            return decisions
        return [d for d in decisions if getattr(d, "message_id", None) not in volatile]

    def _carry_out(self, d: Decision, envelope: bytes | None) -> Event | None:
        if isinstance(d, Send):
            return self._transmit(d, envelope)
        chunk = isinstance(d, Delivered | Failed) and self.volatile.pop(d.message_id, None) is not None
        if isinstance(d, Delivered):
            self.delivered.append(d)
            if not chunk:  # a chunk's outcome is the transfer's business (its acks), not the app's
                self.reports.append(d)
        elif isinstance(d, Failed):
            self.ctx.log.emit(
                "delivery_failed",
                level="warning",
                message_id=d.message_id.hex(),
                attempts=d.attempts,
                last_error=d.last_error,
                reason=d.reason.value,
            )
            if not chunk:
                self._notify(MessageFailed(d.message_id, d.attempts, d.last_error, d.reason.value))
        elif isinstance(d, NextWakeup):
            self._wake_at(d.at)
        return None

    def _log_delivered(self) -> None:
        """One ``messages_delivered`` event for every delivery of the round (an event per message would
        cost more than the delivery itself at full speed), and one ``MessagesDelivered`` report."""
        if self.reports:
            done, self.reports = self.reports, []
            self._notify(
                MessagesDelivered(
                    tuple(d.message_id for d in done), tuple(d.attempts for d in done), tuple(d.transport for d in done)
                )
            )
        if self.delivered:
            done, self.delivered = self.delivered, []
            self.ctx.log.emit(
                "messages_delivered",
                count=len(done),
                message_ids=[d.message_id.hex() for d in done],
                attempts=[d.attempts for d in done],
                transports=sorted({d.transport for d in done if d.transport is not None}),
            )

    def _transmit(self, send: Send, envelope: bytes | None) -> Event | None:
        """Queue the Transmit of ``send`` for this turn's hand-over (or fail the attempt at once)."""
        if envelope is None:
            envelope = self.volatile.get(send.message_id) or self.outbox.payload(send.message_id)
        addresses = self.routes.get(send.recipient, {}).get(send.transport, ())
        if envelope is None or not addresses:
            reason = "the envelope is gone from the outbox" if envelope is None else "no address on this transport"
            return AttemptResult(send.message_id, send.attempt, send.transport, reason, time.time())
        self.outgoing.setdefault(send.transport, []).append(
            (send.message_id, send.recipient, addresses[0], envelope, send)
        )
        return None

    def _flush_transmits(self) -> list[Event]:
        """Hand every queued Transmit to its transport: a TransmitMany per transport, as few as the bound allows.

        An explicit timeout sends at once, so a transport that is down or full fails
        these attempts here, retryably (an ack that cannot be handed over is logged).
        """
        failures: list[Event] = []
        while self.outgoing:
            transport, items = self.outgoing.popitem()
            start = 0
            while start < len(items):
                end, size = start, 0
                while end < len(items) and (end == start or size + len(items[end][3]) <= HANDOFF_BYTES):
                    size += len(items[end][3])
                    end += 1
                chunk = items[start:end]
                start = end
                ids, peers, addresses, envelopes, _ = zip(*chunk, strict=True)
                transmits = TransmitMany(ids, peers, addresses, envelopes, self.name, report_success=False)
                try:
                    self.sender.tell(transport, transmits, timeout=HANDOFF_TIMEOUT)
                except BusError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    for message_id, peer_id, _, _, send in chunk:
                        if send is None:
                            self.ctx.log.emit(
                                "ack_unroutable",
                                level="warning",
                                message_id=message_id.hex(),
                                peer_id=peer_id,
                                reason=str(exc),
                            )
                        else:
                            failures.append(
                                AttemptResult(send.message_id, send.attempt, send.transport, error, time.time())
                            )
        return failures

    def _wake_at(self, at: float) -> None:
        if self.wake is not None:
            if self.wake_at is not None and self.wake_at <= at:
                # The timer set fires first: its Tick makes the state ask again for what is next
                # then. (Every ack moves the earliest deadline later: no timer churn per message.)
                return
            self.wake.cancel()
        self.wake_at = at
        self.wake = self.schedule(max(0.0, at - time.time()), _Wake())

    def _notify(self, msg: object) -> None:
        if self.report_to is None:
            return
        try:
            self.tell(self.report_to, msg)
        except BusError as exc:
            self.ctx.log.emit("report_undeliverable", level="warning", to=self.report_to, reason=str(exc))

    def _set_routes(self, routes: PeerRoutes) -> None:
        usable = {t: a for t, a in routes.addresses if t in TRANSPORT_NAMES and a}
        if usable:
            self.routes[routes.peer_id] = usable
        else:
            self.routes.pop(routes.peer_id, None)
        self._step([Routes(routes.peer_id, tuple(usable), time.time())])

    # -- receiving -----------------------------------------------------------------------------------------

    def _received_many(self, batch: list[Received]) -> None:
        """Envelopes from peers: acks settle messages; new messages are accepted in one commit (R1),
        then acked (R2: one ack envelope per sender and arrival transport), then handed to the app."""
        now = time.time()
        acked: list[Event] = []
        accepted: list[tuple[bytes, float, bytes]] = []
        arrived: list[Message] = []
        to_ack: dict[tuple[str, str], list[bytes]] = {}
        for msg in batch:
            try:
                message = decode(msg.envelope)
            except ProtocolError as exc:
                self.ctx.log.emit("envelope_rejected", level="warning", transport=msg.transport, reason=str(exc))
                continue
            if message.recipient != self.node_id:
                reason = f"addressed to {message.recipient!r}, not this node (no relaying)"
                self.ctx.log.emit("envelope_rejected", level="warning", transport=msg.transport, reason=reason)
                continue
            if message.kind == ACK_KIND and message.correlation_id is not None:
                acked.extend(AckReceived(i, now) for i in ack_ids(message.correlation_id, message.payload))
                continue
            if message.is_expired(now):
                reason = f"message {message.id.hex()} expired at {message.expires_at}"
                self.ctx.log.emit("envelope_rejected", level="info", transport=msg.transport, reason=reason)
                continue
            self.received += 1
            if message.kind == CHUNK_KIND and self.transfer_to is not None:
                self._hand_chunk(message, msg.envelope, msg.transport)
                continue
            accepted.append((message.id, message.expires_at, msg.envelope))
            arrived.append(message)
            # R2 for a duplicate too (its first ack may be lost)
            to_ack.setdefault((message.sender, msg.transport), []).append(message.id)
        new = self.inbox.accept_many(accepted) if accepted else set()  # R1: committed
        self._ack_all(to_ack, now)
        to_app: list[tuple[bytes, bytes]] = []
        for message, (_, _, envelope) in zip(arrived, accepted, strict=True):
            if message.id not in new:
                self.duplicates += 1
                continue
            new.discard(message.id)  # an id twice in one batch is handed over once
            if self.transfer_to is not None and message.kind in (TRANSFER_KIND, CHUNK_KIND):
                self._hand_to_app(message.id, envelope, message.kind)
            else:
                to_app.append((message.id, envelope))
        if to_app:
            self._hand_all_to_app(to_app)
        self._step(acked)  # every settled message in one commit; the acks' Transmits go with this turn's

    def _hand_chunk(self, message: Message, envelope: bytes, transport: str) -> None:
        """A transfer's chunk: straight to ``transfer_to``, not stored; acked once it is Handled (committed).
        A chunk it cannot take is dropped unacknowledged: the sender sends it again. A copy of a chunk
        held already is handed over too (the first may have been lost in a crash of ``transfer_to``,
        which tells a chunk it committed from a new one)."""
        if message.id in self.chunks_held:
            self.duplicates += 1
        assert self.transfer_to is not None
        try:
            self.tell(self.transfer_to, Incoming(message.id, envelope))
        except BusError as exc:
            self.ctx.log.emit("dispatch_failed", level="warning", message_id=message.id.hex(), reason=str(exc))
            return
        self.chunks_held[message.id] = (message.sender, transport, time.monotonic())
        if not self.sweeping:
            self.sweeping = True
            self.schedule(self._hold_s, _SweepHeld())

    @property
    def _hold_s(self) -> float:
        return float(self.state_settings.get("ack_timeout", DEFAULT_ACK_TIMEOUT))

    def _sweep_held(self, now: float) -> None:
        """Forget the chunks held longer than the ack timeout: ``transfer_to`` lost them (it crashed with
        them unhandled), and by then the sender has given that attempt up, sending the chunk again (the
        same id, held anew when it comes) or failing it (the transfer re-offers and sends new chunks).
        Without this, each lost chunk stayed here for good. A Handled that still comes for one is an
        inbox mark of nothing; its chunk is acked when its next copy is handled."""
        cutoff = now - self._hold_s
        for message_id in [m for m, (_, _, at) in self.chunks_held.items() if at <= cutoff]:
            del self.chunks_held[message_id]
        if self.chunks_held and not self.sweeping:
            self.sweeping = True
            oldest = min(at for _, _, at in self.chunks_held.values())
            self.schedule(max(0.0, oldest + self._hold_s - now), _SweepHeld())

    def _handled(self, ids: list[bytes]) -> None:
        """Messages ``deliver_to`` or ``transfer_to`` handled: inbox marks, and the acks of held chunks."""
        to_ack: dict[tuple[str, str], list[bytes]] = {}
        marks = []
        for message_id in ids:
            held = self.chunks_held.pop(message_id, None)
            if held is None:
                marks.append(message_id)
            else:
                to_ack.setdefault(held[:2], []).append(message_id)
        if marks:
            self.inbox.mark_handled_many(marks)
            self.undispatched.difference_update(marks)
        if to_ack:
            self._ack_all(to_ack, time.time())
            self._step([])  # hands the acks' Transmits over

    def _ack_all(self, to_ack: dict[tuple[str, str], list[bytes]], now: float) -> None:
        """Queue the acks of ``to_ack`` (ids per sender and arrival transport): one envelope per
        ``ACK_IDS_MAX`` ids on a transport that batches acks, one per id elsewhere."""
        for (sender, transport), ids in to_ack.items():
            per_ack = ACK_IDS_MAX if transport in BATCH_ACKS else 1
            for start in range(0, len(ids), per_ack):
                self._ack(sender, transport, ids[start : start + per_ack], now)

    def _ack(self, peer: str, arrived_on: str, ids: list[bytes], now: float) -> None:
        """Queue one ack envelope for the messages ``ids`` from ``peer`` (which came in on ``arrived_on``)."""
        ack = Message(
            id=new_id(),
            kind=ACK_KIND,
            sender=self.node_id,
            recipient=peer,
            priority=Priority.CRITICAL,
            created_at=now,
            ttl=ACK_TTL,
            correlation_id=ids[0],
            payload=b"".join(ids[1:]),
        )
        # An ack goes back on the connection its messages came in on (the peer authenticated it,
        # and it works before this node has a route to the sender); a transport that cannot do
        # that gets the route instead.
        routes = self.routes.get(peer, {})
        transport: str | None = arrived_on
        if arrived_on in REPLY_CAPABLE:
            address = REPLY_ADDRESS
        else:
            transport = arrived_on if arrived_on in routes else next_transport(self.mode, routes, ())
            if transport is None:
                self.ctx.log.emit("ack_unroutable", level="warning", message_id=ids[0].hex(), peer_id=peer)
                return  # the sender retries; by then the registry may know a route back
            address = routes[transport][0]
        assert transport is not None
        self.outgoing.setdefault(transport, []).append((ack.id, peer, address, encode_message(ack), None))

    def _hand_all_to_app(self, messages: list[tuple[bytes, bytes]]) -> None:
        """Tell ``deliver_to`` these new ``(id, envelope)``, none for ``transfer_to``, in one IncomingMany."""
        if self.deliver_to is None:
            self.inbox.mark_handled_many([m for m, _ in messages])  # nobody to hand them to: counted as handled
            return
        ids = tuple(m for m, _ in messages)
        try:
            self.tell(self.deliver_to, IncomingMany(ids, tuple(e for _, e in messages)))
        except BusError as exc:
            self._refused(ids, exc)
            return
        if self.undispatched:
            self.undispatched.difference_update(ids)

    def _hand_to_app(self, message_id: bytes, envelope: bytes | None = None, kind: str | None = None) -> None:
        """Tell ``deliver_to`` the message (``envelope`` and its ``kind`` if in hand, else the stored one)."""
        if self.deliver_to is None:
            self.inbox.mark_handled(message_id)  # nobody to hand it to: counted as handled
            return
        if envelope is None:
            envelope = self.inbox.payload(message_id)
        if envelope is None:
            self.undispatched.discard(message_id)
            return  # handled meanwhile
        to = self.deliver_to
        if kind is None and self.transfer_to is not None:
            kind = decode(envelope).kind
        if kind in (TRANSFER_KIND, CHUNK_KIND) and self.transfer_to is not None:
            to = self.transfer_to  # a large transfer's message: its actor commits it and answers Handled
        try:
            self.tell(to, Incoming(message_id, envelope))
        except BusError as exc:
            self._refused((message_id,), exc)
            return
        self.undispatched.discard(message_id)

    def _refused(self, ids: tuple[bytes, ...], exc: BusError) -> None:
        """The hand-over of ``ids`` to the app was refused: logged, and tried again every :data:`REDISPATCH_EVERY`."""
        for message_id in ids:
            self.ctx.log.emit("dispatch_failed", level="warning", message_id=message_id.hex(), reason=str(exc))
        if not self.undispatched:
            self.schedule(REDISPATCH_EVERY, _Redispatch())
        self.undispatched.update(ids)


# --- client API: callers never build the messages ---------------------------------------------------------


def send_envelope(client: Sender, envelope: bytes, *, name: str = "retrier", timeout: float = 5.0) -> bytes:
    """Hand an encoded envelope to the retrier; returns its message id once it is stored (durable).

    Raises:
        LocalProtocolError: the retrier refused it (invalid envelope, broadcast).
    """
    reply = client.ask(name, Deliver(envelope), timeout=timeout)
    if not isinstance(reply, DeliverReply):
        raise BusError(f"retrier {name!r} answered Deliver with {reply!r}")
    if reply.error is not None or reply.message_id is None:
        raise LocalProtocolError(f"retrier refused the envelope: {reply.error}")
    return reply.message_id


def send_envelopes(
    client: Sender, envelopes: list[bytes], *, name: str = "retrier", timeout: float = 5.0
) -> DeliverManyReply:
    """Hand several encoded envelopes to the retrier in one ask; it answers once all are stored (one commit).

    The reply names, per envelope and in order, its message id and the error that refused it (None: stored).
    """
    reply = client.ask(name, DeliverMany(tuple(envelopes)), timeout=timeout)
    if not isinstance(reply, DeliverManyReply) or len(reply.errors) != len(envelopes):
        raise BusError(f"retrier {name!r} answered DeliverMany of {len(envelopes)} with {reply!r}")
    return reply


def mark_handled(client: Sender, message_id: bytes, *, name: str = "retrier") -> None:
    """Tell the retrier the application has handled ``message_id`` (it will not be dispatched again)."""
    client.tell(name, Handled(message_id))


def retrier_status(client: Sender, *, name: str = "retrier", timeout: float = 5.0) -> RetrierStatus:
    """The retrier's counters and queue sizes."""
    reply = client.ask(name, GetRetrierStatus(), timeout=timeout)
    if not isinstance(reply, RetrierStatus):
        raise BusError(f"retrier {name!r} answered GetRetrierStatus with {reply!r}")
    return reply
