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
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from villagemesh.errors import ConfigError, DeliveryFailed
from villagemesh.protocols.envelope import Message

__all__ = ["DeliveryHandle", "DeliveryState", "DeliveryStatus", "HandleTable", "InboundMessage", "Subscribers"]

Handler = Callable[[Any], Any]

ANY_KIND = "*"
"""Subscribe to this kind to receive every message."""


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

    @classmethod
    def of(cls, message: Message, *, redelivered: bool) -> InboundMessage:
        """``message`` with the flag."""
        return cls(*[getattr(message, name) for name in _MESSAGE_FIELDS], redelivered=redelivered)


_MESSAGE_FIELDS = tuple(f.name for f in fields(Message))
"""The envelope's fields in order (read once: ``dataclasses.fields`` costs microseconds a call)."""


@dataclass(frozen=True)
class _Subscription:
    handler: Handler
    loop: asyncio.AbstractEventLoop | None
    """For a coroutine handler: the loop it was subscribed from, where it runs."""


class Subscribers:
    """kind -> handlers. Handlers are called in the gateway's thread; coroutine handlers
    run on the event loop that was running when they subscribed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_kind: dict[str, list[_Subscription]] = {}

    def add(self, kind: str, handler: Handler) -> Callable[[], None]:
        """Subscribe ``handler`` to ``kind`` (``"*"`` for all); returns the unsubscribe function."""
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"message kind must be a non-empty string, got {kind!r}")
        if not callable(handler):
            raise ConfigError(f"handler for {kind!r} must be callable, got {handler!r}")
        loop = None
        if inspect.iscoroutinefunction(handler):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise ConfigError(
                    f"coroutine handler {handler!r} must be subscribed from a running event loop"
                ) from None
        sub = _Subscription(handler, loop)
        with self._lock:
            self._by_kind.setdefault(kind, []).append(sub)

        def unsubscribe() -> None:
            with self._lock:
                subs = self._by_kind.get(kind, [])
                if sub in subs:
                    subs.remove(sub)

        return unsubscribe

    def for_kind(self, kind: str) -> list[_Subscription]:
        """Handlers for ``kind`` then for every kind, in subscription order."""
        with self._lock:
            return [*self._by_kind.get(kind, ()), *self._by_kind.get(ANY_KIND, ())]


class DeliveryState(enum.Enum):
    """Where an outbound message is."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class DeliveryStatus:
    """The end of an outbound message: delivered, or failed after ``attempts`` with ``last_error``."""

    message_id: str
    state: DeliveryState
    attempts: int
    last_error: str | None

    @property
    def delivered(self) -> bool:
        """True once the recipient acknowledged the message."""
        return self.state is DeliveryState.DELIVERED


class DeliveryHandle:
    """What ``Node.send`` returns: wait for (or await) the message's end."""

    def __init__(self, message_id: bytes) -> None:
        self.message_id = message_id
        self._done = threading.Event()
        self._status = DeliveryStatus(message_id.hex(), DeliveryState.PENDING, 0, None)
        self._callbacks: list[Callable[[DeliveryStatus], None]] = []
        self._lock = threading.Lock()

    @property
    def status(self) -> DeliveryStatus:
        """The status now (PENDING until the end)."""
        return self._status

    def done(self) -> bool:
        """Whether the message reached its end."""
        return self._done.is_set()

    def wait(self, timeout: float) -> DeliveryStatus:
        """Block up to ``timeout`` seconds for the end; the status then (maybe still PENDING)."""
        self._done.wait(timeout)
        return self._status

    def result(self, timeout: float) -> DeliveryStatus:
        """Like :meth:`wait`, but raises DeliveryFailed for a failed message and TimeoutError if pending."""
        status = self.wait(timeout)
        if status.state is DeliveryState.PENDING:
            raise TimeoutError(f"message {status.message_id} still pending after {timeout} s")
        if status.state is DeliveryState.FAILED:
            raise DeliveryFailed(status.message_id, status.attempts, status.last_error or "unknown")
        return status

    def add_done_callback(self, fn: Callable[[DeliveryStatus], None]) -> None:
        """Call ``fn(status)`` at the end (at once if already ended), in the gateway's thread."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self._status)

    def __await__(self) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[DeliveryStatus] = loop.create_future()

        waker = _waker(loop)
        self.add_done_callback(lambda status: waker.settle(future, status))
        return future.__await__()

    def _resolve(self, status: DeliveryStatus) -> None:
        with self._lock:
            self._status = status
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(status)


class _LoopWaker:
    """Settles awaited handles on their loop, one wake-up for all resolved meanwhile.

    The gateway resolves handles in a burst (one per acknowledged message); a
    ``call_soon_threadsafe`` each would wake the loop once per handle.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._due: list[tuple[asyncio.Future[DeliveryStatus], DeliveryStatus]] = []

    def settle(self, future: asyncio.Future[DeliveryStatus], status: DeliveryStatus) -> None:
        """From any thread: ``future`` gets ``status`` on the loop."""
        with self._lock:
            self._due.append((future, status))
            first = len(self._due) == 1
        if first:
            try:
                self.loop.call_soon_threadsafe(self._run)
            except RuntimeError:
                return  # the loop is closed: nobody awaits these any more

    def _run(self) -> None:
        with self._lock:
            due, self._due = self._due, []
        for future, status in due:
            if not future.done():
                future.set_result(status)


_WAKERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWaker] = weakref.WeakKeyDictionary()
_WAKERS_LOCK = threading.Lock()


def _waker(loop: asyncio.AbstractEventLoop) -> _LoopWaker:
    with _WAKERS_LOCK:
        waker = _WAKERS.get(loop)
        if waker is None:
            waker = _WAKERS[loop] = _LoopWaker(loop)
        return waker


class HandleTable:
    """message id -> handle, until the message's end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: dict[bytes, DeliveryHandle] = {}

    def new(self, message_id: bytes) -> DeliveryHandle:
        """A handle for a message about to be sent."""
        handle = DeliveryHandle(message_id)
        with self._lock:
            self._handles[message_id] = handle
        return handle

    def resolve(self, message_id: bytes, delivered: bool, attempts: int, last_error: str | None) -> bool:
        """End the handle of ``message_id``; False if nobody holds one (e.g. sent before a restart)."""
        with self._lock:
            handle = self._handles.pop(message_id, None)
        if handle is None:
            return False
        state = DeliveryState.DELIVERED if delivered else DeliveryState.FAILED
        handle._resolve(DeliveryStatus(message_id.hex(), state, attempts, last_error))
        return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._handles)
