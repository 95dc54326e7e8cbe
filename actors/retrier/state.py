"""The delivery retrier's pure core: which message goes out next, on which transport, and when.

:class:`RetrierState` is a state machine driven by events and answering with
decisions; it never reads a clock (every event carries ``now``), never sleeps
and does no I/O. The actor persists what the decisions say in the outbox
(:mod:`.store`), performs the sends, and schedules a ``Tick`` at each
``NextWakeup``::

    events in                                   decisions out
    ─────────                                   ─────────────
    Enqueue(id, recipient, priority, ...)  ──►  Send(id, recipient, transport, attempt, deadline)
    Routes(recipient, transports)          ──►  Backoff(id, attempts, next_attempt_at, last_error, failed)
    AttemptResult(id, attempt, error, ...) ──►  Delivered(id, attempts, transport)
    AckReceived(id)                        ──►  Failed(id, attempts, last_error, reason)
    TransportLost(transport)                     NextWakeup(at)
    Tick(now)

A message's life (``failed`` is the set of transports that failed this round)::

                 Enqueue
                    │            next_attempt_at ≤ now
                    ▼            ─────────────────────►
                 WAITING ─────────────────────────────── READY ◄──── Routes(recipient, ≠ ∅)
                    ▲                                      │  picked         ▲
                    │ Backoff: attempts < budget           │  (fair queue)   │
                    │                                      ├── no route ──► PARKED ── route_timeout ──► Failed(NO_ROUTE)
                    │                                      ▼
                    └──── error / no ack by deadline ── IN_FLIGHT ──── AckReceived ──► Delivered
                                                                    └── budget spent ──► Failed
                 any state, now ≥ expires_at ──► Failed(TTL_EXPIRED)

    due (or picked), recipient unreachable (rule 8), not its probe
                    │
                    ▼
                  HELD ─── recipient reachable again: its probe got through, ──► READY
                    │      an ack, Routes(recipient), TransportLost
                    └───── recipient's backoff over, the most urgent oldest ──► READY, as its probe

Rules (each a test or a hypothesis invariant):

1. *Nothing is lost.* Every enqueued id is exactly one of: delivered,
   failed, or pending. Each id gets at most one ``Delivered`` or one
   ``Failed``, never both.
2. *One send at a time.* A ``Send`` for an id is decided only when the id is
   not in flight; an id leaves IN_FLIGHT by its ack, an error result, or its
   deadline (``ack_timeout`` after the send) passing, which counts as a failed
   attempt. Results for an older attempt are ignored.
3. *Budget.* ``attempts ≤ policy.max_attempts`` always. After a failed
   attempt with budget left, the retry waits ``policy.delay(attempts, rand)``
   where ``rand`` is derived from the message id and attempt number (a hash),
   so retries of different messages spread out and a replay gives the same
   schedule. Exception: a *retryable* transport error (the peer surely did
   not get the bytes) while a transport of the current round is still
   untried fails over to it at once. A non-retryable error (the peer may
   have the bytes) does not end the attempt: the ack or the deadline does.
   The budget spent → ``Failed(ATTEMPTS_EXHAUSTED)``.
4. *TTL.* At ``expires_at`` a message is failed whatever its state
   (``Failed(TTL_EXPIRED)``); an in-flight copy may still arrive: ``Failed``
   means "not confirmed", as urllib3 distinguishes "not sent" from "not known".
5. *Failover.* Each attempt uses :func:`.modes.next_transport`: the first
   transport, in the network mode's order, that the recipient has and that has
   not failed this round; when all have failed the round restarts. A recipient
   without any transport is PARKED: it spends no attempts and waits for a
   ``Routes`` event, at most ``route_timeout`` seconds (then
   ``Failed(NO_ROUTE)``: an unknown peer is not waited for a whole TTL), or
   its TTL if sooner. ``TransportLost(t)`` (the transport's actor died) fails
   every attempt in flight on ``t`` at once, as a retryable error: the
   recipient's inbox deduplicates, so a copy the dead transport did send is harmless.
6. *Priorities without starvation.* At most ``max_in_flight`` messages are in
   flight; free slots go to READY messages by stride scheduling over the
   priority classes (:class:`FairQueue`): class weights CRITICAL 16, HIGH 8,
   NORMAL 4, LOW 2, BULK 1. CRITICAL wins every tie and takes 16 of 31 picks
   while all classes are busy. The head of class ``c`` is picked within
   :func:`max_picks_before` ``(c)`` picks however fast other classes fill
   (CRITICAL 5, HIGH 7, NORMAL 11, LOW 19, BULK 35), so a message with ``k``
   ahead of it in its class goes within ``(k + 1)`` times that. FIFO within a class.
7. *Acks.* An ack settles a pending message in any phase (a late ack after a
   timeout still counts); acks for unknown ids, or for a message never sent
   (attempts 0), are ignored.
8. *Unreachable peers* (a circuit breaker, like TCP's backoff of a
   connection rather than of each segment). When an attempt's round ends
   with every transport of it failing *retryably* (the peer surely got
   nothing: refused, dial backoff, no connection), its recipient ``P`` is
   *unreachable* for ``policy.delay(r, rand)``, ``r`` being P's consecutive
   such rounds and ``rand`` derived from P's id and ``r``. While P is
   unreachable its due messages are HELD: they spend no attempt, no write and
   no Transmit, and take no slot. At most one message to P, the *probe* (the
   HELD one of the most urgent class, oldest first), is attempted at a time,
   when P's backoff is over; it goes through the fair queue like any message.
   The probe's round failing wholly retryably again makes ``r + 1``; anything
   else it gets (a non-retryable error, a transport that took the bytes, no
   ack by its deadline) ends P's unreachability, as do an ack of any message
   to P, ``Routes(P, …)`` (new addresses) and ``TransportLost`` (a restarted
   transport may work): the HELD messages go READY in arrival order. Messages
   already in flight when P became unreachable finish their attempt; their
   retries are HELD. TTLs still fail HELD messages at ``expires_at``. Only
   probes send, but the budget still holds: each probe round refused counts,
   for every message HELD at that moment, as the round it would have made, and
   a HELD message whose attempts plus such rounds reach ``max_attempts`` fails
   (``ATTEMPTS_EXHAUSTED``, its last error the probe's), so ``max_attempts``
   bounds how long a message waits for a down peer as it did before. Those
   rounds are not persisted; nor is unreachability: a restart starts with
   every peer reachable.

Persistence is the actor's: it writes ``Send`` (attempts, deadline as the next
attempt time, so a crash mid-flight retries at the deadline) and ``Backoff``
to the outbox before acting, deletes on ``Delivered``/``Failed``, and after a
restart replays every outbox row as an ``Enqueue`` with its stored counters.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from villagemesh.errors import ConfigError
from villagemesh.protocols.envelope import Priority

from .modes import NetworkMode, next_transport, transport_order
from .policy import RetryPolicy

__all__ = [
    "STRIDES",
    "WEIGHTS",
    "AckReceived",
    "AttemptResult",
    "Backoff",
    "Decision",
    "Delivered",
    "Enqueue",
    "Event",
    "FailReason",
    "Failed",
    "FairQueue",
    "NextWakeup",
    "PeerView",
    "PendingView",
    "Phase",
    "RetrierState",
    "Routes",
    "Send",
    "Tick",
    "TransportLost",
    "jitter_rand",
    "max_picks_before",
]

DEFAULT_ACK_TIMEOUT = 30.0
"""Seconds to wait for an end-to-end ack before an attempt counts as failed: one
heartbeat period of the replaced system, far above any loopback or LAN round trip."""

DEFAULT_ROUTE_TIMEOUT = 30.0
"""Seconds a message waits PARKED for a route to its recipient before it fails (NO_ROUTE):
a few discovery rounds, so a peer being found is waited for and an unknown id is not."""

DEFAULT_MAX_IN_FLIGHT = 1024
"""Messages awaiting an ack at once (the window): enough for batches of a few hundred to be on
the wire, acked and refilled while the next are written (256 left the link idle between acks),
few enough that a late CRITICAL message queues behind at most a fraction of a second of BULK."""

WEIGHTS: dict[Priority, int] = {
    Priority.CRITICAL: 16,
    Priority.HIGH: 8,
    Priority.NORMAL: 4,
    Priority.LOW: 2,
    Priority.BULK: 1,
}
"""Share of the picks each class gets while every class is busy (16 + 8 + 4 + 2 + 1 = 31)."""

STRIDES: dict[Priority, int] = {p: max(WEIGHTS.values()) // w for p, w in WEIGHTS.items()}
"""Integer strides (16 / weight): a pick advances its class's pass by its stride."""


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Enqueue:
    """A message to deliver (new, or restored from the outbox with its counters)."""

    message_id: bytes
    recipient: str
    priority: Priority
    expires_at: float
    now: float
    attempts: int = 0
    next_attempt_at: float | None = None
    """None: as soon as possible."""
    last_error: str | None = None
    failed: tuple[str, ...] = ()
    """Transports that failed in the current round."""


@dataclass(frozen=True, slots=True)
class Routes:
    """The transports ``recipient`` is reachable on now (from the registry)."""

    recipient: str
    transports: tuple[str, ...]
    now: float


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """A transport's answer to a ``Send``: ``error`` None means it took the bytes.

    ``retryable`` (urllib3's distinction, the transport contract's flag): True
    when the peer surely did not get the bytes (connection refused), so the
    next transport may be tried at once; False when it may have, so the
    retrier keeps waiting for the ack until the deadline.
    """

    message_id: bytes
    attempt: int
    transport: str
    error: str | None
    now: float
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class AckReceived:
    """The recipient acknowledged ``message_id`` end to end."""

    message_id: bytes
    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    """Time has passed (the timer for a ``NextWakeup`` fired)."""

    now: float


@dataclass(frozen=True, slots=True)
class TransportLost:
    """The actor of ``transport`` died: whatever it had in flight will get no answer from it."""

    transport: str
    now: float


Event = Enqueue | Routes | AttemptResult | AckReceived | Tick | TransportLost


# --- decisions ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message_id`` on ``transport``; this is attempt number ``attempt`` (1-based)."""

    message_id: bytes
    recipient: str
    transport: str
    attempt: int
    deadline: float
    """No ack by then: the attempt failed."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """An attempt failed; the message is retried at ``next_attempt_at`` (persist this)."""

    message_id: bytes
    attempts: int
    next_attempt_at: float
    last_error: str
    failed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Delivered:
    """The recipient acknowledged the message: forget it."""

    message_id: bytes
    attempts: int
    transport: str | None


class FailReason(enum.Enum):
    """Why a message was given up on."""

    TTL_EXPIRED = "ttl_expired"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    NO_ROUTE = "no_route"


@dataclass(frozen=True, slots=True)
class Failed:
    """The message was given up on (the actor raises ``DeliveryFailed`` from this)."""

    message_id: bytes
    attempts: int
    last_error: str
    reason: FailReason


@dataclass(frozen=True, slots=True)
class NextWakeup:
    """Deliver a ``Tick`` at ``at`` (replaces any earlier wake-up request)."""

    at: float


Decision = Send | Backoff | Delivered | Failed | NextWakeup


# --- the fair queue -----------------------------------------------------------------------

_PRIORITIES = tuple(Priority)
"""The classes, most urgent first (iterating the Enum itself costs a generator per pick)."""

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Per-priority FIFO queues picked by stride scheduling; items may go stale.

    Each class has a *pass*; a pick takes the non-empty class with the lowest
    (pass, priority) and advances its pass by its stride. A class that becomes
    non-empty starts at ``vtime + stride`` (``vtime`` = the pass of the last
    pick), so idle time earns no credit and a newcomer cannot starve the busy.
    Invariant: every non-empty class has ``vtime ≤ pass ≤ vtime + stride``, which
    bounds the picks of other classes before a class's head is taken
    (:func:`max_picks_before`).

    ``live(item)`` says whether a queued item still wants out; stale items are
    dropped when they reach the head (lazy deletion) and never count as picks.
    """

    def __init__(self, live: Callable[[T], bool]) -> None:
        self._live = live
        self._queues: dict[Priority, deque[T]] = {p: deque() for p in Priority}
        self._order = [(p, self._queues[p]) for p in _PRIORITIES]
        """The classes most urgent first, with their queues (a pick's one pass, no lookups)."""
        self._pass: dict[Priority, int] = dict.fromkeys(Priority, 0)
        self._vtime = 0

    def push(self, priority: Priority, item: T) -> None:
        """Queue ``item`` at the tail of its class."""
        queue = self._queues[priority]
        self._purge(queue)
        if not queue:
            self._pass[priority] = max(self._pass[priority], self._vtime + STRIDES[priority])
        queue.append(item)

    def pop(self) -> tuple[Priority, T] | None:
        """The next live item by the stride rule, or None when none is queued."""
        live, passes = self._live, self._pass
        best: Priority | None = None
        best_pass = 0
        best_queue: deque[T] | None = None
        for priority, queue in self._order:  # most urgent first, so ties go to it
            while queue and not live(queue[0]):  # stale heads go (as _purge)
                queue.popleft()
            if queue and (best is None or passes[priority] < best_pass):
                best, best_pass, best_queue = priority, passes[priority], queue
        if best is None or best_queue is None:
            return None
        self._vtime = best_pass
        passes[best] = best_pass + STRIDES[best]
        return best, best_queue.popleft()

    def __bool__(self) -> bool:
        for queue in self._queues.values():
            self._purge(queue)
            if queue:
                return True
        return False

    def _purge(self, queue: deque[T]) -> None:
        live = self._live
        while queue and not live(queue[0]):
            queue.popleft()


def max_picks_before(priority: Priority) -> int:
    """Upper bound on picks, the class's own included, until the head of ``priority`` is taken.

    While the class waits with pass ``p_c ≤ vtime + s_c``, another class ``d``
    (pass ≥ vtime, +``s_d`` per pick) is picked at most ``⌊s_c / s_d⌋ + 1`` times.
    """
    own = STRIDES[priority]
    return 1 + sum(own // STRIDES[other] + 1 for other in Priority if other is not priority)


# --- the state machine --------------------------------------------------------------------


class Phase(enum.Enum):
    """Where a pending message is in its life."""

    WAITING = "waiting"  # for next_attempt_at
    READY = "ready"  # due, in the fair queue for a free slot
    IN_FLIGHT = "in_flight"  # sent, waiting for its ack until the deadline
    PARKED = "parked"  # due, but the recipient has no transport
    HELD = "held"  # due, but the recipient is unreachable: waits for its probe to get through


@dataclass(slots=True)
class _Entry:
    message_id: bytes
    recipient: str
    priority: Priority
    expires_at: float
    attempts: int
    next_attempt_at: float
    last_error: str | None
    failed: tuple[str, ...]
    phase: Phase = Phase.WAITING
    version: int = 0
    transport: str | None = None
    deadline: float = 0.0
    seq: int = 0
    """Arrival order (FIFO among the held)."""
    dark: bool = True
    """Every transport that failed this round failed retryably (the recipient surely got nothing)."""
    witnessed: int = 0
    """Probe rounds refused while this message was HELD (rule 8: each counts against its budget)."""


@dataclass(slots=True)
class _Peer:
    """An unreachable recipient (rule 8): its backoff, its probe, the messages held for it."""

    rounds: int
    """Consecutive rounds that failed wholly retryably."""
    until: float
    """No probe before this."""
    probe: bytes | None = None
    """The one message attempted while unreachable, from its pick until its round ends."""
    held: list[tuple[int, int, bytes, int]] = field(default_factory=list)
    """Heap of (priority, seq, id, version): the probe is the most urgent, oldest (stale items skipped)."""
    held_ids: set[bytes] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class PendingView:
    """A read-only snapshot of one pending message (for statistics and tests)."""

    message_id: bytes
    recipient: str
    priority: Priority
    phase: Phase
    attempts: int
    next_attempt_at: float
    expires_at: float
    transport: str | None
    failed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PeerView:
    """A read-only snapshot of an unreachable recipient (rule 8)."""

    recipient: str
    rounds: int
    probe_at: float
    """When its backoff is over (the next probe may go)."""
    probe: bytes | None
    held: int


def jitter_rand(message_id: bytes, attempt: int) -> float:
    """A number in [0, 1) fixed by (message id, attempt): the jitter's randomness, replayable."""
    digest = hashlib.blake2b(message_id + attempt.to_bytes(4, "big"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass
class _Counters:
    sent: int = 0
    delivered: int = 0
    failed: int = 0
    retried: int = 0
    probes: int = 0


@dataclass
class RetrierState:
    """The outbox's decision logic. Feed events to :meth:`step`; act on the decisions it returns."""

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    mode: NetworkMode = NetworkMode.HYBRID
    ack_timeout: float = DEFAULT_ACK_TIMEOUT
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    route_timeout: float = DEFAULT_ROUTE_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("ack_timeout", "route_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int | float) and value > 0):
                raise ConfigError(f"{name} must be seconds > 0, got {value!r}")
        if isinstance(self.max_in_flight, bool) or not isinstance(self.max_in_flight, int) or self.max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be an int ≥ 1, got {self.max_in_flight!r}")
        self.mode = NetworkMode.parse(self.mode)
        self._entries: dict[bytes, _Entry] = {}
        self._routes: dict[str, tuple[str, ...]] = {}
        self._parked: dict[str, set[bytes]] = {}
        self._ready: FairQueue[tuple[bytes, int]] = FairQueue(self._is_ready)
        self._timers: list[tuple[float, bytes, int]] = []  # (at, id, version): WAITING due / IN_FLIGHT deadline
        self._expiry: list[tuple[float, bytes]] = []
        self._in_flight = 0
        self._peers: dict[str, _Peer] = {}  # the unreachable ones only
        self._peer_timers: list[tuple[float, str]] = []  # (until, recipient): a probe may go
        self._seq = 0
        self._wakeup_sent: float | None = None
        self.counters = _Counters()

    # -- queries ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._entries

    @property
    def in_flight(self) -> int:
        """Messages sent and not yet acked, failed or timed out."""
        return self._in_flight

    def view(self, message_id: bytes) -> PendingView | None:
        """A snapshot of a pending message, or None when it is not pending."""
        e = self._entries.get(message_id)
        if e is None:
            return None
        return PendingView(
            e.message_id,
            e.recipient,
            e.priority,
            e.phase,
            e.attempts,
            e.next_attempt_at,
            e.expires_at,
            e.transport,
            e.failed,
        )

    @property
    def held(self) -> int:
        """Messages HELD for an unreachable recipient."""
        return sum(len(peer.held_ids) for peer in self._peers.values())

    def unreachable(self) -> list[PeerView]:
        """Every recipient unreachable now (rule 8)."""
        return [
            PeerView(recipient, peer.rounds, peer.until, peer.probe, len(peer.held_ids))
            for recipient, peer in self._peers.items()
        ]

    def pending(self) -> Iterator[PendingView]:
        """Every pending message (in no particular order)."""
        for message_id in list(self._entries):
            view = self.view(message_id)
            if view is not None:
                yield view

    # -- the one entry point ------------------------------------------------------------------

    def step(self, event: Event) -> list[Decision]:
        """Apply one event; return what to do now, in order."""
        out: list[Decision] = []
        self._apply(event, out)
        self._pump(event.now, out)
        return out

    def step_many(self, events: list[Event]) -> list[Decision]:
        """Apply ``events`` in order, then look at time and slots once, at the latest ``now``: what a
        batch of events decides, without a pass over the timers and slots per event."""
        out: list[Decision] = []
        for event in events:
            self._apply(event, out)
        if events:
            self._pump(max(event.now for event in events), out)
        return out

    def _apply(self, event: Event, out: list[Decision]) -> None:
        match event:
            case Enqueue():
                self._enqueue(event, out)
            case Routes():
                self._set_routes(event)
            case AttemptResult():
                self._attempt_result(event, out)
            case AckReceived():
                self._ack(event, out)
            case TransportLost():
                self._transport_lost(event, out)
            case Tick():
                self._wakeup_sent = None  # the timer fired: whatever is next must be asked for again
            case _:
                raise ConfigError(f"RetrierState cannot handle {event!r}")

    # -- event handlers -------------------------------------------------------------------------

    def _enqueue(self, ev: Enqueue, out: list[Decision]) -> None:
        if ev.message_id in self._entries:
            return  # idempotent: a restore racing a resubmission, or a caller retrying
        if not isinstance(ev.priority, Priority):
            raise ConfigError(f"priority must be a Priority, got {ev.priority!r}")
        if isinstance(ev.attempts, bool) or not 0 <= ev.attempts <= self.policy.max_attempts:
            raise ConfigError(
                f"message {ev.message_id.hex()}: attempts {ev.attempts!r} outside [0, {self.policy.max_attempts}]"
            )
        due = ev.now if ev.next_attempt_at is None else ev.next_attempt_at
        failed = tuple(ev.failed)
        entry = _Entry(
            ev.message_id, ev.recipient, ev.priority, ev.expires_at, ev.attempts, due, ev.last_error, failed
        )
        entry.seq = self._seq
        entry.dark = not failed  # a restored round's earlier failures are unknown: it does not count
        self._seq += 1
        self._entries[ev.message_id] = entry
        heapq.heappush(self._expiry, (entry.expires_at, entry.message_id))
        if due <= ev.now:
            # Due already: READY in arrival order (through the timer heap, messages enqueued at one
            # instant by step_many would come out in message-id order, not FIFO).
            self._due(entry, ev.now)
        else:
            self._wait(entry)

    def _set_routes(self, ev: Routes) -> None:
        self._routes[ev.recipient] = tuple(ev.transports)
        self._reachable(ev.recipient)  # new addresses may work
        if not ev.transports:
            return
        for message_id in self._parked.pop(ev.recipient, set()):
            entry = self._entries.get(message_id)
            if entry is not None and entry.phase is Phase.PARKED:
                self._make_ready(entry)

    def _attempt_result(self, ev: AttemptResult, out: list[Decision]) -> None:
        entry = self._entries.get(ev.message_id)
        if entry is None or entry.phase is not Phase.IN_FLIGHT or entry.attempts != ev.attempt:
            return  # late answer for an attempt already settled
        if ev.error is None or not ev.retryable:
            if ev.error is not None:
                entry.last_error = f"{ev.transport}: {ev.error}"
            if self._is_probe(entry):
                self._reachable(entry.recipient)  # the probe got somewhere: the peer answers again
            # The transport took it, or the peer may have it (resending now could only duplicate):
            # the ack or the deadline settles it.
            return
        self._attempt_failed(entry, f"{ev.transport}: {ev.error}", ev.now, out, failover=True, dark=True)

    def _ack(self, ev: AckReceived, out: list[Decision]) -> None:
        entry = self._entries.get(ev.message_id)
        if entry is None or entry.attempts == 0:
            return  # a duplicate ack, one for a message given up on, or for one never sent
        self._remove(entry)
        self.counters.delivered += 1
        out.append(Delivered(entry.message_id, entry.attempts, entry.transport))
        self._reachable(entry.recipient)  # an ack is proof the peer is up

    def _transport_lost(self, ev: TransportLost, out: list[Decision]) -> None:
        for recipient in list(self._peers):
            self._reachable(recipient)  # the transport comes back new: it may reach them
        lost = [e for e in self._entries.values() if e.phase is Phase.IN_FLIGHT and e.transport == ev.transport]
        for entry in lost:
            self._attempt_failed(entry, f"{ev.transport}: the transport died", ev.now, out, failover=True)

    # -- transitions ----------------------------------------------------------------------------

    def _wait(self, entry: _Entry) -> None:
        entry.phase = Phase.WAITING
        entry.version += 1
        heapq.heappush(self._timers, (entry.next_attempt_at, entry.message_id, entry.version))

    def _make_ready(self, entry: _Entry) -> None:
        entry.phase = Phase.READY
        entry.version += 1
        self._ready.push(entry.priority, (entry.message_id, entry.version))

    def _due(self, entry: _Entry, now: float) -> None:
        """``entry`` wants out: READY, or HELD when its recipient is unreachable and it is not the probe."""
        peer = self._peers.get(entry.recipient)
        if peer is None or peer.probe == entry.message_id:
            self._make_ready(entry)
        else:
            self._hold(entry, peer, now)

    def _attempt_failed(
        self,
        entry: _Entry,
        error: str,
        now: float,
        out: list[Decision],
        *,
        failover: bool = False,
        dark: bool = False,
    ) -> None:
        """The attempt in flight failed; ``dark``: retryably (the recipient surely got nothing)."""
        self._in_flight -= 1
        entry.phase = Phase.WAITING  # out of flight; _wait or _give_up settles it below
        entry.last_error = error
        if entry.transport is not None and entry.transport not in entry.failed:
            entry.failed = (*entry.failed, entry.transport)
        entry.dark = entry.dark and dark
        untried = set(transport_order(self.mode, self._routes.get(entry.recipient, ()))) - set(entry.failed)
        probe = self._is_probe(entry)
        if not dark:
            if probe:
                self._reachable(entry.recipient)  # the probe's bytes went somewhere (no ack by the deadline)
        elif not untried and (entry.dark or probe):
            self._round_dark(entry, now, out)
        if entry.attempts >= self.policy.max_attempts:
            self._give_up(entry, FailReason.ATTEMPTS_EXHAUSTED, out)
            return
        if failover and untried:
            entry.next_attempt_at = now  # surely not received: the next transport, at once
        else:
            rand = jitter_rand(entry.message_id, entry.attempts)
            entry.next_attempt_at = now + self.policy.delay(entry.attempts, rand)
        self.counters.retried += 1
        out.append(Backoff(entry.message_id, entry.attempts, entry.next_attempt_at, error, entry.failed))
        self._wait(entry)

    # -- reachability (rule 8) -------------------------------------------------------------------

    def _is_probe(self, entry: _Entry) -> bool:
        peer = self._peers.get(entry.recipient)
        return peer is not None and peer.probe == entry.message_id

    def _round_dark(self, entry: _Entry, now: float, out: list[Decision]) -> None:
        """A round to ``entry``'s recipient failed wholly retryably: it is unreachable (again, for longer)."""
        recipient = entry.recipient
        peer = self._peers.get(recipient)
        if peer is None:
            peer = self._peers[recipient] = _Peer(rounds=1, until=now)
        elif peer.probe == entry.message_id:
            peer.rounds += 1
            peer.probe = None
            self._held_round_refused(peer, entry.last_error, out)
        else:
            return  # an attempt from before it went unreachable: its retries are held, the backoff stands
        peer.until = now + self.policy.delay(peer.rounds, jitter_rand(recipient.encode(), peer.rounds))
        heapq.heappush(self._peer_timers, (peer.until, recipient))

    def _held_round_refused(self, peer: _Peer, error: str | None, out: list[Decision]) -> None:
        """The probe's round was refused: it counts for every held message; those out of budget fail."""
        spent = []
        for message_id in peer.held_ids:
            held = self._entries[message_id]
            held.witnessed += 1
            if held.attempts + held.witnessed >= self.policy.max_attempts:
                spent.append(held)
        for held in sorted(spent, key=lambda e: e.seq):
            held.last_error = f"unreachable for {held.witnessed} probe round(s) while held; last: {error}"
            self._give_up(held, FailReason.ATTEMPTS_EXHAUSTED, out)

    def _reachable(self, recipient: str) -> None:
        """``recipient`` may be reachable: its held messages go READY, in arrival order."""
        peer = self._peers.pop(recipient, None)
        if peer is None:
            return
        for entry in sorted((self._entries[i] for i in peer.held_ids), key=lambda e: e.seq):
            self._make_ready(entry)

    def _hold(self, entry: _Entry, peer: _Peer, now: float) -> None:
        entry.phase = Phase.HELD
        entry.version += 1
        heapq.heappush(peer.held, (entry.priority, entry.seq, entry.message_id, entry.version))
        first = not peer.held_ids
        peer.held_ids.add(entry.message_id)
        if peer.probe is not None:
            return  # its round's end decides
        if peer.until <= now:
            self._start_probe(peer)  # the backoff is over and nothing probes: the best held one goes
        elif first:
            heapq.heappush(self._peer_timers, (peer.until, entry.recipient))  # a timer only for something held

    def _start_probe(self, peer: _Peer) -> None:
        """Make the most urgent, oldest held message ``peer``'s probe (READY), if any is held."""
        while peer.held:
            _, _, message_id, version = heapq.heappop(peer.held)
            entry = self._entries.get(message_id)
            if entry is not None and entry.version == version and entry.phase is Phase.HELD:
                peer.held_ids.discard(message_id)
                peer.probe = message_id
                self.counters.probes += 1
                self._make_ready(entry)
                return

    def _start_probes(self, now: float) -> None:
        timers = self._peer_timers
        while timers and timers[0][0] <= now:
            at, recipient = heapq.heappop(timers)
            if self._probe_due(recipient, at):
                self._start_probe(self._peers[recipient])

    def _probe_due(self, recipient: str, at: float) -> bool:
        """Whether the peer timer (``at``, ``recipient``) still means a probe may go then."""
        peer = self._peers.get(recipient)
        return peer is not None and peer.until == at and peer.probe is None and bool(peer.held_ids)

    def _give_up(self, entry: _Entry, reason: FailReason, out: list[Decision]) -> None:
        self._remove(entry)
        self.counters.failed += 1
        if reason is FailReason.TTL_EXPIRED:
            detail = f"ttl expired at {entry.expires_at}"
            last = f"{detail}; last error: {entry.last_error}" if entry.last_error else detail
        else:
            last = entry.last_error or "no attempt left"
        out.append(Failed(entry.message_id, entry.attempts, last, reason))

    def _remove(self, entry: _Entry) -> None:
        if entry.phase is Phase.IN_FLIGHT:
            self._in_flight -= 1
        elif entry.phase is Phase.PARKED:
            self._parked[entry.recipient].discard(entry.message_id)
        elif entry.phase is Phase.HELD:
            self._peers[entry.recipient].held_ids.discard(entry.message_id)
        peer = self._peers.get(entry.recipient)
        if peer is not None and peer.probe == entry.message_id:
            peer.probe = None  # gone before its round ended: the next held one may probe
            heapq.heappush(self._peer_timers, (peer.until, entry.recipient))
        del self._entries[entry.message_id]
        entry.version += 1  # every queued reference goes stale

    # -- time and slots -------------------------------------------------------------------------

    def _is_ready(self, item: tuple[bytes, int]) -> bool:
        entry = self._entries.get(item[0])
        return entry is not None and entry.version == item[1] and entry.phase is Phase.READY

    def _pump(self, now: float, out: list[Decision]) -> None:
        self._expire(now, out)
        self._fire_timers(now, out)
        self._start_probes(now)
        self._fill_slots(now, out)
        self._request_wakeup(now, out)

    def _expire(self, now: float, out: list[Decision]) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, message_id = heapq.heappop(expiry)
            entry = self._entries.get(message_id)
            if entry is not None:
                self._give_up(entry, FailReason.TTL_EXPIRED, out)

    def _fire_timers(self, now: float, out: list[Decision]) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, message_id, version = heapq.heappop(timers)
            entry = self._entries.get(message_id)
            if entry is None or entry.version != version:
                continue
            if entry.phase is Phase.WAITING:
                self._due(entry, now)
            elif entry.phase is Phase.PARKED:
                entry.last_error = f"no route to {entry.recipient} within {self.route_timeout} s"
                self._give_up(entry, FailReason.NO_ROUTE, out)
            elif entry.phase is Phase.IN_FLIGHT:
                self._attempt_failed(entry, f"{entry.transport}: no ack within {self.ack_timeout} s", now, out)

    def _fill_slots(self, now: float, out: list[Decision]) -> None:
        while self._in_flight < self.max_in_flight:
            picked = self._ready.pop()
            if picked is None:
                return
            entry = self._entries[picked[1][0]]
            peer = self._peers.get(entry.recipient)
            if peer is not None and peer.probe != entry.message_id:
                self._hold(entry, peer, now)  # READY before its recipient went unreachable
                continue
            if entry.attempts >= self.policy.max_attempts:
                # Only a restored message can be here: its last attempt was cut off by a crash.
                self._give_up(entry, FailReason.ATTEMPTS_EXHAUSTED, out)
                continue
            transport = next_transport(self.mode, self._routes.get(entry.recipient, ()), entry.failed)
            if transport is None:
                entry.phase = Phase.PARKED
                entry.version += 1
                self._parked.setdefault(entry.recipient, set()).add(entry.message_id)
                heapq.heappush(self._timers, (now + self.route_timeout, entry.message_id, entry.version))
                continue
            if transport in entry.failed:
                entry.failed = ()  # every transport failed this round: a new round starts
                entry.dark = True
            entry.attempts += 1
            entry.phase = Phase.IN_FLIGHT
            entry.version += 1
            entry.transport = transport
            entry.deadline = now + self.ack_timeout
            self._in_flight += 1
            self.counters.sent += 1
            heapq.heappush(self._timers, (entry.deadline, entry.message_id, entry.version))
            out.append(Send(entry.message_id, entry.recipient, transport, entry.attempts, entry.deadline))

    def _request_wakeup(self, now: float, out: list[Decision]) -> None:
        if self._wakeup_sent is not None and self._wakeup_sent <= now:
            self._wakeup_sent = None  # that timer has fired (or is moot)
        at = self._next_deadline()
        if at is not None and at != self._wakeup_sent:
            self._wakeup_sent = at
            out.append(NextWakeup(at))

    def _next_deadline(self) -> float | None:
        timers, expiry, entries = self._timers, self._expiry, self._entries
        while timers:
            _, message_id, version = timers[0]
            entry = entries.get(message_id)
            if entry is not None and entry.version == version:
                break
            heapq.heappop(timers)
        while expiry and expiry[0][1] not in entries:
            heapq.heappop(expiry)
        peer_timers = self._peer_timers
        while peer_timers and not self._probe_due(peer_timers[0][1], peer_timers[0][0]):
            heapq.heappop(peer_timers)  # stale: reachable again, backed off anew, probing, or nothing held
        candidates = [heap[0][0] for heap in (timers, expiry, peer_timers) if heap]
        return min(candidates) if candidates else None
