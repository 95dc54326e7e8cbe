"""Subscribers and delivery handles: the thread-safe tables the node and its gateway share.

The application registers handlers from any thread (``Node.subscribe``) and
holds :class:`DeliveryHandle`\\s; the gateway actor calls handlers with
:class:`InboundMessage`\\s and resolves handles from its own thread. Both
tables are small and locked.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass, fields
from typing import Any, NewType

from villagemesh.errors import ConfigError, DeliveryFailed, OutboxFull, RemoteError, Unconfirmed, Unhandled
from villagemesh.protocols.envelope import Message

__all__ = [
    "DeliveryHandle",
    "DeliveryState",
    "DeliveryStatus",
    "GatewayCounters",
    "HandleTable",
    "InboundMessage",
    "MessageId",
    "OutboxLimits",
    "Subscribers",
    "call_on_loop",
    "message_id_of",
]

Handler = Callable[[Any], Any]

ANY_KIND = "*"
"""Subscribe to this kind to receive every message."""

RESERVED_PREFIX = "villagemesh."
"""Kinds the node itself sends (outcome reports); nobody subscribes to them."""


@dataclass(frozen=True, slots=True)
class InboundMessage(Message):
    """A received message as a handler gets it: the envelope's fields, and ``redelivered``.

    ``redelivered`` is False on a message's first dispatch, which is the only
    one unless the node died while its handlers ran (or in the instant after
    they returned, before the gateway committed that): then the message is
    dispatched again after the restart with ``redelivered`` True. A handler
    whose effect must happen once checks, for a redelivered message, whether
    that effect is already there (by ``id``).
    """

    redelivered: bool = False
    value: Any = None
    """The payload decoded by the node's codec (the bytes themselves with the default ``bytes`` codec)."""

    @classmethod
    def of(cls, message: Message, *, redelivered: bool, value: Any = None) -> InboundMessage:
        """``message`` with the flag and its decoded payload.

        Its fields are copied as they are, not checked again: ``message`` is a Message, whose
        construction checked them (half the cost of a dispatch's bookkeeping, measured).
        """
        new = object.__new__(cls)
        for name in _MESSAGE_FIELDS:
            _SET(new, name, getattr(message, name))
        _SET(new, "redelivered", redelivered)
        _SET(new, "value", value)
        return new


_MESSAGE_FIELDS = tuple(f.name for f in fields(Message))
"""The envelope's fields in order (read once: ``dataclasses.fields`` costs microseconds a call)."""
_SET = object.__setattr__  # (how a frozen dataclass sets its own fields)


@dataclass(frozen=True)
class _Subscription:
    handler: Handler
    loop: asyncio.AbstractEventLoop | None
    """The loop running where it was subscribed: a coroutine handler runs there, and so does
    a coroutine a plain handler returns (None: subscribed outside a loop)."""
    is_coroutine: bool = False


class Subscribers:
    """kind -> handlers. Plain handlers are called in the gateway's thread; coroutine handlers
    run on the event loop that was running when they subscribed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_kind: dict[str, list[_Subscription]] = {}

    def add(self, kind: str, handler: Handler) -> Callable[[], None]:
        """Subscribe ``handler`` to ``kind`` (``"*"`` for all); returns the unsubscribe function."""
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"message kind must be a non-empty string, got {kind!r}")
        if kind.startswith(RESERVED_PREFIX):
            raise ConfigError(f"message kinds starting {RESERVED_PREFIX!r} are reserved for the node, got {kind!r}")
        if not callable(handler):
            raise ConfigError(f"handler for {kind!r} must be callable, got {handler!r}")
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        is_coroutine = inspect.iscoroutinefunction(handler)
        if is_coroutine and loop is None:
            raise ConfigError(f"coroutine handler {handler!r} must be subscribed from a running event loop")
        sub = _Subscription(handler, loop, is_coroutine)
        with self._lock:
            self._by_kind.setdefault(kind, []).append(sub)

        def unsubscribe() -> None:
            with self._lock:
                subs = self._by_kind.get(kind, [])
                if sub in subs:
                    subs.remove(sub)

        return unsubscribe

    def has(self, kind: str) -> bool:
        """Whether anything would receive ``kind``."""
        with self._lock:
            return bool(self._by_kind.get(kind) or self._by_kind.get(ANY_KIND))

    def for_kind(self, kind: str) -> list[_Subscription]:
        """Handlers for ``kind`` then for every kind, in subscription order."""
        with self._lock:
            return [*self._by_kind.get(kind, ()), *self._by_kind.get(ANY_KIND, ())]


MessageId = NewType("MessageId", str)
"""A message's id as the API shows it: its 16 bytes in lower-case hex (32 characters)."""


def message_id_of(raw: bytes) -> MessageId:
    """The :data:`MessageId` of the envelope id ``raw``."""
    return MessageId(raw.hex())


class DeliveryState(enum.Enum):
    """Where an outbound message is. Every state but PENDING is terminal.

    ``DELIVERED`` means the recipient's handlers took the message and returned
    (its outcome report said ``handled``), not merely that the bytes arrived.
    """

    PENDING = "pending"
    DELIVERED = "delivered"
    UNHANDLED = "unhandled"
    """It reached the recipient, which has no handler for its kind."""
    HANDLER_FAILED = "handler_failed"
    """A handler at the recipient raised (``remote_type``, ``last_error``)."""
    FAILED = "failed"
    """It never reached a handler: refused at once, no route, attempts spent, or TTL expired."""
    UNCONFIRMED = "unconfirmed"
    """The recipient acked it, but its outcome report did not come within the bound."""


@dataclass(frozen=True)
class DeliveryStatus:
    """The state of an outbound message; at its end, what became of it and why."""

    message_id: MessageId
    state: DeliveryState
    attempts: int
    last_error: str | None
    """The reason of any end but DELIVERED (the last transport error, the remote exception's message...)."""
    acked: bool = False
    """The recipient acknowledged receipt (its handlers' outcome may still be pending)."""
    remote_type: str | None = None
    """HANDLER_FAILED: the type name of the exception the remote handler raised."""
    reply: bytes | None = None
    """DELIVERED: the encoded first non-None value a remote handler returned (requests read it)."""
    peer_id: str = ""

    @property
    def delivered(self) -> bool:
        """True once a handler at the recipient took the message and returned."""
        return self.state is DeliveryState.DELIVERED

    def exception(self) -> DeliveryFailed | None:
        """The error for an end that is not DELIVERED (None while pending or once delivered)."""
        state, mid, attempts, reason = self.state, self.message_id, self.attempts, self.last_error or "unknown"
        if state is DeliveryState.UNHANDLED:
            return Unhandled(mid, attempts, reason)
        if state is DeliveryState.HANDLER_FAILED:
            return RemoteError(mid, attempts, self.remote_type or "Exception", reason)
        if state is DeliveryState.UNCONFIRMED:
            return Unconfirmed(mid, attempts, reason)
        if state is DeliveryState.FAILED:
            return DeliveryFailed(mid, attempts, reason)
        return None


class DeliveryHandle:
    """What ``Node.send`` returns: wait for (or await) the message's end."""

    def __init__(self, message_id: bytes, peer_id: str = "", size: int = 0) -> None:
        self.raw_id = message_id
        self.message_id = message_id_of(message_id)
        self.peer_id = peer_id
        self.size = size
        self._ended = False
        self._status = DeliveryStatus(self.message_id, DeliveryState.PENDING, 0, None, peer_id=peer_id)
        self._callbacks: list[Callable[[DeliveryStatus], None]] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<DeliveryHandle {self.message_id} to {self.peer_id or '?'} {self._status.state.value}>"

    @property
    def status(self) -> DeliveryStatus:
        """The status now (PENDING until the end)."""
        return self._status

    def done(self) -> bool:
        """Whether the message reached its end."""
        return self._ended

    def wait(self, timeout: float) -> DeliveryStatus:
        """Block up to ``timeout`` seconds for the end; the status then (maybe still PENDING)."""
        with self._lock:
            if self._ended:
                return self._status
            ended = threading.Event()  # made only for a waiter: most handles are awaited or polled
            self._callbacks.append(lambda _status: ended.set())
        ended.wait(timeout)
        return self._status

    def result(self, timeout: float) -> DeliveryStatus:
        """Like :meth:`wait`, but raises for any end but DELIVERED, and TimeoutError if pending.

        Raises:
            Unhandled: the recipient has no handler for the kind.
            RemoteError: a handler at the recipient raised.
            Unconfirmed: acked, but no outcome report came.
            DeliveryFailed: it never reached a handler (the base of the three above).
            TimeoutError: still pending after ``timeout`` seconds.
        """
        status = self.wait(timeout)
        if status.state is DeliveryState.PENDING:
            raise TimeoutError(f"message {status.message_id} still pending after {timeout} s")
        error = status.exception()
        if error is not None:
            raise error
        return status

    def add_done_callback(self, fn: Callable[[DeliveryStatus], None]) -> None:
        """Call ``fn(status)`` at the end (at once if already ended), in the resolving thread."""
        with self._lock:
            if not self._ended:
                self._callbacks.append(fn)
                return
        fn(self._status)

    def __await__(self) -> Generator[Any, None, DeliveryStatus]:
        """``await handle``: the final status (never raises for a failed message: see ``.result``)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[DeliveryStatus] = loop.create_future()

        def settle(status: DeliveryStatus) -> None:
            if not future.done():
                future.set_result(status)

        def resolve(status: DeliveryStatus) -> None:
            call_on_loop(loop, settle, status)

        self.add_done_callback(resolve)
        return future.__await__()

    def _acked(self, attempts: int) -> None:
        with self._lock:
            if not self._ended:
                s = self._status  # (built directly: dataclasses.replace costs more than the rest of an ack)
                self._status = DeliveryStatus(
                    s.message_id, s.state, attempts, s.last_error, True, s.remote_type, s.reply, s.peer_id
                )

    def _resolve(self, status: DeliveryStatus) -> None:
        with self._lock:
            if self._ended:
                return
            self._status = status
            self._ended = True
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(status)


class _LoopPost:
    """Calls posted to one event loop from other threads, run together: a burst of resolved
    handles wakes the loop once (one ``call_soon_threadsafe``), not once per handle."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.calls: list[tuple[Callable[[Any], None], Any]] = []

    def post(self, fn: Callable[[Any], None], arg: Any) -> None:
        with self.lock:
            self.calls.append((fn, arg))
            if len(self.calls) > 1:
                return  # a drain is already scheduled
        try:
            self.loop.call_soon_threadsafe(self.drain)
        except RuntimeError:
            return  # the loop has closed: nobody awaits any more

    def drain(self) -> None:
        with self.lock:
            calls, self.calls = self.calls, []
        for fn, arg in calls:
            fn(arg)


_POSTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopPost] = weakref.WeakKeyDictionary()
_POSTS_LOCK = threading.Lock()


def call_on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[Any], None], arg: Any) -> None:
    """Run ``fn(arg)`` on ``loop`` soon (from any thread)."""
    with _POSTS_LOCK:
        post = _POSTS.get(loop)
        if post is None:
            post = _POSTS[loop] = _LoopPost(loop)
    post.post(fn, arg)


@dataclass(frozen=True)
class OutboxLimits:
    """Bounds on this node's unfinished sends (stored, in flight, or awaiting their outcome).

    A send that would pass any bound waits for room (``Node.send`` up to its
    ``block`` timeout, then :class:`~villagemesh.errors.OutboxFull`; ``asend``
    awaits). One message is always admitted into an empty window, whatever its size.
    """

    per_peer_messages: int = 1000
    per_peer_bytes: int = 16 * 1024 * 1024
    total_messages: int = 10_000
    total_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"outbox limit {f.name} must be an int >= 1, got {value!r}")


class HandleTable:
    """message id -> handle, until the message's end; and the send window the handles occupy.

    Late ends (an outcome for a handle a request stopped waiting for) are
    dropped and counted in :attr:`late`.
    """

    def __init__(self, limits: OutboxLimits | None = None) -> None:
        self.limits = limits or OutboxLimits()
        self._lock = threading.Condition()
        self._handles: dict[bytes, DeliveryHandle] = {}
        self._per_peer: dict[str, tuple[int, int]] = {}
        self._count = 0
        self._bytes = 0
        self._room_waiters: list[Callable[[], None]] = []
        self._abandoned: set[bytes] = set()
        self._waiting = 0
        """Senders in :meth:`new` waiting for room (a freed slot notifies only when there are some)."""
        self.late = 0
        """Ends that came for a request its caller had stopped waiting for."""

    # -- the window --------------------------------------------------------------------------

    def _full(self, peer_id: str, size: int) -> str | None:
        """Which bound ``size`` more bytes to ``peer_id`` would pass (None: room). Lock held."""
        count, nbytes = self._per_peer.get(peer_id, (0, 0))
        lim = self.limits
        if count and count + 1 > lim.per_peer_messages:
            return f"{count} messages pending to this peer (per_peer_messages={lim.per_peer_messages})"
        if count and nbytes + size > lim.per_peer_bytes:
            return f"{nbytes} bytes pending to this peer (per_peer_bytes={lim.per_peer_bytes})"
        if self._count and self._count + 1 > lim.total_messages:
            return f"{self._count} messages pending in all (total_messages={lim.total_messages})"
        if self._count and self._bytes + size > lim.total_bytes:
            return f"{self._bytes} bytes pending in all (total_bytes={lim.total_bytes})"
        return None

    def try_new(self, message_id: bytes, peer_id: str, size: int) -> DeliveryHandle | str:
        """A handle taking room in the window, or the bound that leaves no room (a str); the pending
        handle of ``message_id`` if it has one (a resend with the same id takes no more room)."""
        with self._lock:
            if (pending := self._handles.get(message_id)) is not None:
                return pending
            full = self._full(peer_id, size)
            if full is not None:
                return full
            return self._add(message_id, peer_id, size)

    def new(self, message_id: bytes, peer_id: str = "", size: int = 0, *, timeout: float = 0.0) -> DeliveryHandle:
        """A handle for a message about to be sent, waiting up to ``timeout`` s for room; the pending
        handle of ``message_id`` if it has one (a resend with the same id takes no more room).

        Raises:
            OutboxFull: no room came within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            if (pending := self._handles.get(message_id)) is not None:
                return pending
            while (full := self._full(peer_id, size)) is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OutboxFull(peer_id, full, timeout)
                self._waiting += 1
                try:
                    self._lock.wait(left)
                finally:
                    self._waiting -= 1
            return self._add(message_id, peer_id, size)

    def _add(self, message_id: bytes, peer_id: str, size: int) -> DeliveryHandle:
        handle = DeliveryHandle(message_id, peer_id, size)
        self._handles[message_id] = handle
        count, nbytes = self._per_peer.get(peer_id, (0, 0))
        self._per_peer[peer_id] = (count + 1, nbytes + size)
        self._count += 1
        self._bytes += size
        return handle

    def on_room(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` once, the next time room is freed (asyncio senders wait so)."""
        with self._lock:
            self._room_waiters.append(fn)

    def _release(self, handle: DeliveryHandle) -> list[Callable[[], None]]:
        count, nbytes = self._per_peer.pop(handle.peer_id, (1, handle.size))
        if count > 1:
            self._per_peer[handle.peer_id] = (count - 1, nbytes - handle.size)
        self._count -= 1
        self._bytes -= handle.size
        if self._waiting:
            self._lock.notify_all()
        waiters, self._room_waiters = self._room_waiters, []
        return waiters

    @property
    def pending_messages(self) -> int:
        """Unfinished sends in the window."""
        return self._count

    @property
    def pending_bytes(self) -> int:
        """Their payload bytes."""
        return self._bytes

    # -- ends -------------------------------------------------------------------------------

    def get(self, message_id: bytes) -> DeliveryHandle | None:
        """The pending handle of ``message_id``.

        No lock: one ``dict.get`` is atomic, and a handle is added before its message is sent
        and removed once, by :meth:`resolve` (the lock is for the window's counts)."""
        return self._handles.get(message_id)

    def acked(self, message_id: bytes, attempts: int) -> bool:
        """The recipient acked ``message_id``: its handle stays pending until the outcome. False if
        it has no pending handle."""
        handle = self._handles.get(message_id)
        if handle is None:
            return False
        handle._acked(attempts)
        return True

    def abandon(self, message_id: bytes) -> None:
        """Its caller stopped waiting (a request timed out): a later end is dropped and counted."""
        with self._lock:
            if message_id in self._handles:
                self._abandoned.add(message_id)

    def resolve(
        self,
        message_id: bytes,
        delivered: bool | DeliveryState,
        attempts: int | None,
        last_error: str | None,
        *,
        remote_type: str | None = None,
        reply: bytes | None = None,
    ) -> DeliveryHandle | None:
        """End the handle of ``message_id``; None if nobody holds one (e.g. sent before a restart).

        ``attempts`` None keeps the count the handle has (an outcome report does not know it).
        """
        with self._lock:
            handle = self._handles.pop(message_id, None)
            if handle is None:
                return None
            if message_id in self._abandoned:
                self._abandoned.discard(message_id)
                self.late += 1
            waiters = self._release(handle)
        if isinstance(delivered, DeliveryState):
            state = delivered
        else:
            state = DeliveryState.DELIVERED if delivered else DeliveryState.FAILED
        old = handle.status
        if attempts is None:
            # An outcome report can overtake the retrier's ack (they travel apart): one from the
            # recipient proves an attempt reached it, as it proves the ack (``acked`` below).
            attempts = max(old.attempts, 1) if state in _ACKED_ENDS else old.attempts
        handle._resolve(
            DeliveryStatus(
                handle.message_id,
                state,
                attempts,
                last_error,
                acked=old.acked or state in _ACKED_ENDS,
                remote_type=remote_type,
                reply=reply,
                peer_id=handle.peer_id,
            )
        )
        for fn in waiters:
            fn()
        return handle

    def __len__(self) -> int:
        with self._lock:
            return len(self._handles)


_ACKED_ENDS = frozenset({DeliveryState.DELIVERED, DeliveryState.UNHANDLED, DeliveryState.HANDLER_FAILED})


@dataclass
class GatewayCounters:
    """What the app gateway counted, kept across its restarts (the node shows them in network_status)."""

    dispatched: int = 0
    """Messages handed to handlers (a redelivery counts again)."""
    unhandled: int = 0
    """Messages of a kind nobody subscribes to (reported to their senders)."""
    handler_failed: int = 0
    """Handler failures (one message may count several)."""
    outcomes_sent: int = 0
    outcomes_received: int = 0
    outcomes_unclaimed: int = 0
    """Reports for a send nobody waits for (sent before a restart, or already ended)."""
    unconfirmed: int = 0


class Bridge:
    """Futures of asyncio callers waiting for an answer from the node's actors.

    A caller registers a future (on its running loop) and tells an actor the
    token; the actor's answer is set on the future with
    ``loop.call_soon_threadsafe``: no thread waits for it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._futures: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}

    def register(self) -> tuple[int, asyncio.Future[Any]]:
        """A token and the future its answer resolves (call from a running loop)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            token = next(self._tokens)
            self._futures[token] = (loop, future)
        return token, future

    def forget(self, token: int) -> None:
        """Drop ``token`` (its caller was cancelled or gave up)."""
        with self._lock:
            self._futures.pop(token, None)

    def answer(self, token: int, value: Any = None, error: BaseException | None = None) -> bool:
        """Resolve ``token``'s future on its loop; False if nobody waits for it any more."""
        with self._lock:
            entry = self._futures.pop(token, None)
        if entry is None:
            return False
        loop, future = entry

        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            return False  # the loop has closed: its caller is gone
        return True
