"""The actor base classes: every exit reported, the bus as the inbox, time as a message.

pykka gives threads, inboxes and futures, and nothing for supervision: an
exception in ``on_start`` stops an actor without ``on_failure``, a
``BaseException`` in a handler stops *every* actor in the process, and a crash
logs only through a logger nobody configured. The two classes here close those
gaps so a supervisor can rely on one fact: **every instance that ends, on any
path, reports exactly one** :class:`ExitReport` **to its watcher.**

:class:`Supervised` (a ``pykka.ThreadingActor``)
    * ``on_start`` raising anything, ``BaseException`` included → a CRASH report;
    * a handler raising ``Exception`` → CRASH; raising ``BaseException``
      (``SystemExit``, ``KeyboardInterrupt``) → CRASH of this actor alone,
      never pykka's ``stop_all``;
    * a thread the actor owns (:meth:`Supervised.spawn_thread`) dying or ending
      while the actor runs → CRASH of the actor;
    * ``stop()`` → NORMAL; ``on_stop`` runs on crashes too (after ``on_start``
      succeeded), so cleanup lives in one place.

:class:`Actor` (a :class:`Supervised` on the bus)
    Its pykka inbox reads both pykka's own control queue (stop, timers, proxies)
    and the actor's bus mailbox socket (see :mod:`.bus`). Subclasses implement
    :meth:`Actor.handle`; for an ask, its return value is the reply (``None``
    becomes :class:`~villagemesh.actors.core.bus.Ok`). A handler that raises on an ask
    first sends the asker a FAULT, so the asker gets ``ActorCrashed`` at once
    instead of waiting for its timeout.

Batches and late replies (OTP's ``gen_server`` ``noreply`` then ``reply/2``)
    An actor that sets :attr:`Actor.batch_limit` gets every message already
    waiting in its mailbox (at most that many) as one turn,
    :meth:`Actor.handle_batch`, each with its :class:`ReplyToken` when it was
    an ask: a store commits them all in one transaction, then answers each
    asker. When one message is waiting it goes alone, at once: a turn never
    waits for more. A handler may also keep an ask's token and answer it later
    (:meth:`Actor.defer_reply`). Every token still unanswered when its turn
    raises, or when the instance ends on any path, is answered with a FAULT:
    its asker gets ``ActorCrashed``, never a hang. A crash drops the tells of
    the turn it happened in (as one tell's crash drops that tell); the rest of
    the mailbox waits for the next instance.

Time is a message: :meth:`Actor.schedule` delivers a message to the instance
after a delay; handlers never sleep. Timers die with their instance.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import pykka
import zmq

from villagemesh.actors.core import bus as busmod
from villagemesh.actors.core import codec
from villagemesh.actors.core.threadnames import name_this_thread
from villagemesh.errors import BusError, CodecError, VillageMeshError

__all__ = [
    "Actor",
    "ActorContext",
    "ActorStopped",
    "CrashInjected",
    "ExitKind",
    "ExitReport",
    "InjectedCrash",
    "OwnedThreadDied",
    "ReplyToken",
    "Request",
    "Scheduler",
    "Supervised",
    "TimerHandle",
    "format_traceback",
]


class ExitKind(enum.Enum):
    """How an actor instance ended."""

    NORMAL = "normal"
    CRASH = "crash"


@dataclass(frozen=True, slots=True)
class ExitReport:
    """What a watcher learns when an instance ends."""

    instance: str
    kind: ExitKind
    exc_type: str | None = None
    exc_message: str | None = None
    traceback: str | None = None

    @property
    def crashed(self) -> bool:
        """True for every exit but a requested stop."""
        return self.kind is ExitKind.CRASH


ExitWatcher = Callable[["Supervised", ExitReport], None]


def format_traceback(exc: BaseException, tb: TracebackType | None) -> str:
    """``traceback.format_exception(exc)`` without Python 3.11's ``^^^`` lines under each frame.

    Python locates those columns for every frame (a walk over the code's positions) and
    draws them by parsing the frame's source line (an ``ast.parse``): two thirds of the
    cost of a crash report, which the restart waits for. Exception groups keep Python's
    own layout."""
    blocks: list[list[str]] = []
    seen: set[int] = set()
    while True:
        if isinstance(exc, BaseExceptionGroup):
            return "".join(traceback.format_exception(exc))
        seen.add(id(exc))
        block = traceback.format_exception_only(exc)
        if tb is not None:
            frames = traceback.StackSummary.extract(traceback.walk_tb(tb)).format()
            block = ["Traceback (most recent call last):\n", *frames, *block]
        blocks.append(block)
        if exc.__cause__ is not None:
            exc, link = exc.__cause__, _CAUSE
        elif exc.__context__ is not None and not exc.__suppress_context__:
            exc, link = exc.__context__, _CONTEXT
        else:
            break
        if id(exc) in seen:
            break
        blocks.append([link])
        tb = exc.__traceback__
    return "".join(line for block in reversed(blocks) for line in block)


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


class OwnedThreadDied(VillageMeshError):
    """A background thread owned by an actor raised or ended while the actor ran."""


class ActorStopped(VillageMeshError):
    """The instance ended with asks it had kept (deferred) still unanswered: their askers are faulted."""


class BaseExceptionInHandler(VillageMeshError):
    """A handler raised a BaseException (SystemExit, KeyboardInterrupt, ...): this actor crashes alone."""


@dataclass(frozen=True, slots=True)
class _ThreadDeath:
    """Control message: an owned thread died (sent through pykka's queue, never the bus)."""

    name: str
    detail: str


class _TimerFired:
    """Control message: a scheduled message is due (``handle`` is set right after scheduling)."""

    __slots__ = ("handle", "message")

    def __init__(self, message: Any) -> None:
        self.message = message
        self.handle: Any = None


class Supervised(pykka.ThreadingActor):
    """A pykka actor that reports every exit of this instance to a watcher."""

    use_daemon_thread = True
    """Daemon threads: a node that is never stopped must not keep the interpreter alive."""

    def __init__(self, *, watcher: ExitWatcher | None = None) -> None:
        super().__init__()
        self.instance = uuid.uuid4().hex[:12]
        self._watcher = watcher
        self._report: ExitReport | None = None
        self._started = False
        self._stop_cleanup_done = False
        self.stopping = threading.Event()
        """Set when the instance is ending: owned threads watch it to finish."""
        self.finished = threading.Event()
        """Set last of all, after the watcher has been told: the instance is gone."""
        self.set_up = threading.Event()
        """Set once ``on_start`` has returned or raised (the instance runs, or is crashing)."""
        self._owned: list[threading.Thread] = []

    @classmethod
    def launch(cls, *args: Any, **kwargs: Any) -> Any:
        """Like pykka's ``start``, but returns the instance (its ``instance`` id, ``finished``
        event) rather than only the ref; ``instance.actor_ref`` is the ref."""
        obj = cls(*args, **kwargs)
        pykka.ActorRegistry.register(obj.actor_ref)
        obj._start_actor_loop()
        return obj

    @property
    def started(self) -> bool:
        """True once ``on_start`` has returned (and until the instance ends)."""
        return self._started and not self.finished.is_set()

    # -- the lifecycle, on every path ------------------------------------------------------

    def _actor_loop(self) -> None:
        try:
            super()._actor_loop()
        except BaseException:  # noqa: BLE001 - recorded and reported below: this is the boundary
            self._record_crash(*sys.exc_info())
        finally:
            self._finish()

    def _actor_loop_setup(self) -> None:
        try:
            self._setup()
            self.on_start()
            self._started = True
            self._after_start()
            name_this_thread()
        except BaseException:  # noqa: BLE001 - an on_start crash is reported, unlike plain pykka
            self._record_crash(*sys.exc_info())
            self._handle_failure(*sys.exc_info())
        finally:
            self.set_up.set()

    def _handle_receive(self, message: Any) -> Any:
        if type(message) is _ThreadDeath:
            raise OwnedThreadDied(f"owned thread {message.name!r} died: {message.detail}")
        try:
            return self._dispatch(message)
        except Exception:
            raise
        except BaseException as exc:
            raise BaseExceptionInHandler(f"{type(exc).__name__}: {exc}") from exc

    def _dispatch(self, message: Any) -> Any:
        """Route one inbox item; subclasses add their own kinds and defer to this."""
        return super()._handle_receive(message)

    def _handle_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Replaces pykka's: record instead of logging to an unconfigured logger.
        self._record_crash(exception_type, exception_value, tb)
        pykka.ActorRegistry.unregister(self.actor_ref)
        self.actor_stopped.set()

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Runs ``on_stop`` after a crash too, so cleanup has one home."""
        self._run_on_stop_once()

    def _stop(self) -> None:
        # pykka calls on_stop here; route it through the once-guard.
        self._before_stop()
        pykka.ActorRegistry.unregister(self.actor_ref)
        self.actor_stopped.set()
        try:
            self._run_on_stop_once()
        except Exception:  # noqa: BLE001 - reported as a crash of this instance
            self._handle_failure(*sys.exc_info())

    def _run_on_stop_once(self) -> None:
        if self._started and not self._stop_cleanup_done:
            self._stop_cleanup_done = True
            self.on_stop()

    def _record_crash(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._report is not None:
            return
        self._report = ExitReport(
            instance=self.instance,
            kind=ExitKind.CRASH,
            exc_type=exception_type.__name__ if exception_type is not None else "Unknown",
            exc_message=str(exception_value),
            traceback=format_traceback(exception_value, tb) if exception_value is not None else None,
        )

    def _setup(self) -> None:
        """Base-class set-up, in the actor's thread, before ``on_start``."""

    def _after_start(self) -> None:
        """Base-class work right after ``on_start`` succeeded, in the actor's thread."""

    def _before_stop(self) -> None:
        """Base-class work when a stop was requested, before ``on_stop`` (the actor's thread)."""

    def _teardown(self) -> None:
        """Base-class tear-down, in the actor's thread, after ``on_stop``."""

    def _finish(self) -> None:
        self.stopping.set()
        try:
            self._teardown()
        except Exception:  # noqa: BLE001 - a failing tear-down is still a crash to report
            self._record_crash(*sys.exc_info())
        for thread in self._owned:
            if thread is not threading.current_thread():
                thread.join(timeout=2.0)
        report = self._report or ExitReport(instance=self.instance, kind=ExitKind.NORMAL)
        try:
            if self._watcher is not None:
                self._watcher(self, report)
        finally:
            self.finished.set()

    # -- owned background threads ------------------------------------------------------------

    def spawn_thread(self, target: Callable[[], None], *, name: str) -> threading.Thread:
        """Run ``target`` in a thread this instance owns.

        If it raises, or returns while the actor is still running, the actor
        crashes (and its supervisor restarts it). ``target`` should return soon
        after :attr:`stopping` is set; the instance waits up to 2 s for it.
        """

        def run() -> None:
            name_this_thread()
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - turned into a crash of the owning actor
                self._owned_thread_died(name, f"{type(exc).__name__}: {exc}")
                return
            if not self.stopping.is_set():
                self._owned_thread_died(name, "it returned while the actor was running")

        thread = threading.Thread(target=run, name=f"{type(self).__name__}:{name}", daemon=True)
        self._owned.append(thread)
        thread.start()
        return thread

    def _owned_thread_died(self, name: str, detail: str) -> None:
        try:
            self.actor_ref.tell(_ThreadDeath(name, detail))
        except pykka.ActorDeadError:
            # The actor ended first; its exit is being reported on its own path.
            return


@codec.message("bus.InjectedCrash")
@dataclass(frozen=True, slots=True)
class InjectedCrash:
    """Fault injection: any actor that receives this crashes (tests, demos, chaos drills)."""

    reason: str


class CrashInjected(VillageMeshError):
    """Raised by an actor that received :class:`InjectedCrash`."""


@codec.message("bus.Ok")
@dataclass(frozen=True, slots=True)
class Ok:
    """The reply to an ask whose handler returned None."""


DRAIN_LIMIT = 10_000
"""Frames a stopping actor handles from its mailbox before it ends (a flood cannot keep it up)."""

_MAX_TIMER_WAIT_S = 3600.0
"""The timer thread re-checks its earliest deadline at least this often."""

QUICK_REPLY_S = 5e-6
"""A reply sent within this time went without this thread being preempted (encoding and
one zmq send take 1-3 µs); the asker running meanwhile on the same CPU takes longer. A
wrong guess costs a microsecond or three either way (see ``_BusInbox.idle``)."""

_OK = Ok()
"""The one Ok reply (messages are immutable, so one instance serves every reply)."""


@dataclass(frozen=True)
class ActorContext:
    """Everything an actor instance is given by its supervisor.

    ``name`` is the bus name (its mailbox must be open); ``log`` the node's
    :class:`~villagemesh.supervision.log.EventLog` (or anything with ``emit``);
    ``scheduler`` the node's timer thread; ``watcher`` is called once when the
    instance ends; ``config`` carries the child's own settings.
    """

    bus: busmod.Bus
    name: str
    log: Any
    scheduler: Scheduler
    watcher: ExitWatcher | None = None
    config: dict[str, Any] = field(default_factory=dict)


_recv = zmq.backend.Socket.recv
"""pyzmq's compiled recv, without the Python-level wrapper."""
_NOBLOCK = zmq.NOBLOCK
_TELL, _ASK, _BATCH = busmod.Kind.TELL, busmod.Kind.ASK, busmod.Kind.BATCH
_perf_counter = time.perf_counter
_zmq_poll = zmq.backend.zmq_poll


def _poll_key(pollable: Any) -> Any:
    """What zmq.Poller reports a pollable as: the zmq socket itself, else its file descriptor."""
    if isinstance(pollable, zmq.Socket | int):
        return pollable
    return pollable.fileno()


class _Envelope:
    """The shape pykka's loop reads an inbox item through (``message``, ``reply_to``)."""

    __slots__ = ("message", "reply_to")

    def __init__(self, message: Any) -> None:
        self.message = message
        self.reply_to = None


class _BusInbox:
    """pykka's inbox, reading pykka's control queue first and then the bus mailbox.

    :meth:`get` returns a control item (an envelope), a mailbox frame (``bytes``,
    which the actor loop handles without an envelope), or a watched pollable's
    item (in an envelope). ``empty()`` speaks only of the control queue: when an
    instance stops, pykka drains the control queue, and the bus mailbox keeps
    its messages for the next instance. Frames a previous instance handed back
    (``mailbox.redeliver``) come before the socket's. An actor can stop reading
    its mailbox for a while (``paused``: flow control) and can :meth:`watch` more
    sockets or file descriptors, which then produce inbox items of their own.
    """

    def __init__(self, mailbox: busmod.Mailbox) -> None:
        self._control: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._socket = mailbox.socket
        self._redeliver = mailbox.redeliver
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Item lists for pyzmq's compiled zmq_poll (the Poller wrapper costs microseconds
        # on every wake-up, which an ask pays twice).
        self._items_all: list[tuple[Any, int]] = [(self._socket, zmq.POLLIN), (self._wake, zmq.POLLIN)]
        self._items_paused: list[tuple[Any, int]] = [(self._wake, zmq.POLLIN)]
        self._watched: dict[Any, Callable[[], Any]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.paused = False
        self.idle = False
        """A hint that the mailbox is probably empty: :meth:`get` then waits on it at once
        instead of trying a read first. A read that finds nothing costs ~3 µs (pyzmq builds
        a ZMQError and libzmq makes a system call), waiting on a frame already there ~1 µs."""

    def put(self, envelope: Any) -> None:
        with self._lock:
            if self._closed:
                raise pykka.ActorDeadError("the actor instance has ended; its inbox is closed")
            self._control.put(envelope)
            os.eventfd_write(self._wake, 1)

    def empty(self) -> bool:
        return self._control.empty()

    def watch(self, pollable: Any, item: Callable[[], Any]) -> None:
        """When ``pollable`` (a zmq socket, an fd, or an object with ``fileno()``) is readable,
        ``get`` returns ``item()``."""
        key = _poll_key(pollable)
        self._watched[key] = item
        self._items_all.append((key, zmq.POLLIN))
        self._items_paused.append((key, zmq.POLLIN))

    def unwatch(self, pollable: Any) -> None:
        """Stop watching ``pollable``."""
        key = _poll_key(pollable)
        if self._watched.pop(key, None) is not None:
            self._items_all.remove((key, zmq.POLLIN))
            self._items_paused.remove((key, zmq.POLLIN))

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        sock = self._socket
        while True:
            if not self._control.empty():
                return self._control.get_nowait()
            if not self.paused:
                if self._redeliver:
                    return self._redeliver.popleft()
                if not self.idle:
                    try:
                        return _recv(sock, _NOBLOCK)
                    except zmq.Again:
                        pass
            ready = _zmq_poll(self._items_paused if self.paused else self._items_all, -1)
            self.idle = False
            for pollable, _ in ready:
                if pollable is sock:
                    continue  # read at the top of the loop, after the control queue
                if pollable == self._wake:
                    os.eventfd_read(self._wake)
                    continue
                item = self._watched.get(pollable)
                if item is not None:
                    return _Envelope(item())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self._wake)


class ReplyToken:
    """The right to answer one ask, kept past the handler's return (``gen_server``'s ``From``).

    Use it in the actor's own thread only (the bus sender is confined there).
    Exactly one answer goes out: later calls are ignored and return False.
    """

    __slots__ = ("_actor", "correlation", "done", "reply_to")

    def __init__(self, actor: Actor, reply_to: str, correlation: int) -> None:
        self._actor = actor
        self.reply_to = reply_to
        self.correlation = correlation
        self.done = False

    def reply(self, answer: object = None) -> bool:
        """Send the answer (None becomes :class:`Ok`); False if this ask was answered already."""
        if self.done:
            return False
        self.done = True
        self._actor._deferred.discard(self)
        self._actor.sender.reply(self.reply_to, self.correlation, _OK if answer is None else answer)
        return True

    def fail(self, exc: BaseException) -> bool:
        """Answer with a FAULT naming ``exc``: the asker gets ``ActorCrashed``. False if answered already."""
        if self.done:
            return False
        self.done = True
        self._actor._deferred.discard(self)
        fault = busmod.Fault(self._actor.name, type(exc).__name__, str(exc))
        self._actor.sender.reply(self.reply_to, self.correlation, fault, fault=True)
        return True


class Request:
    """One message of a batch turn: ``msg``, and ``token`` when it came as an ask (None for a tell)."""

    __slots__ = ("msg", "token")

    def __init__(self, msg: Any, token: ReplyToken | None) -> None:
        self.msg = msg
        self.token = token

    def __repr__(self) -> str:
        return f"Request({self.msg!r}, {'ask' if self.token is not None else 'tell'})"


class Actor(Supervised):
    """A supervised actor with a mailbox on the node's bus.

    Subclasses implement :meth:`handle` and may override ``on_start`` /
    ``on_stop`` (both run in the actor's own thread; make sockets in the first,
    close them in the second).
    """

    def __init__(self, ctx: ActorContext) -> None:
        self.ctx = ctx
        self.name = ctx.name
        self._mailbox = ctx.bus.mailbox(ctx.name)
        self._timers: set[TimerHandle] = set()
        self._acknowledge = ctx.bus.uplink is not None
        self.metrics = ctx.bus.metrics.actor(ctx.name)
        """This name's figures on the bus (outlive the instance); ``metrics.count(key)`` for the actor's own."""
        self._metered = ctx.bus.metrics.enabled
        """In a process child, every handled frame is acknowledged to the node's host."""
        self.sender: busmod.Sender
        self._deferred: set[ReplyToken] = set()
        """Tokens of asks not yet answered (faulted when a turn raises or the instance ends)."""
        self._asking: tuple[str, int] | None = None
        """The ask the current single-message turn handles: what :meth:`defer_reply` takes."""
        self._taken: ReplyToken | None = None
        super().__init__(watcher=ctx.watcher)

    batch_limit = 0
    """Messages one batch turn may take (0: no batch turns, one message per :meth:`handle`).
    A subclass that sets it implements :meth:`handle_batch`. In a process child every frame is
    acknowledged to the host on its own, so there each turn takes one frame (still through
    :meth:`handle`)."""

    def _create_actor_inbox(self) -> Any:  # type: ignore[override]  # pykka calls it from __init__, bound
        self._inbox = _BusInbox(self._mailbox)
        return self._inbox

    def _setup(self) -> None:
        self.sender = busmod.Sender(self.ctx.bus, owner=self.name, coalesce=True)

    def _after_start(self) -> None:
        self.sender.flush()  # tells made in on_start leave now, as a handler turn's would

    def _before_stop(self) -> None:
        """A requested stop waits its turn, as in OTP: what is already in the mailbox is handled
        first (at most :data:`DRAIN_LIMIT` frames), so that a node shutting down does not drop
        the tells its actors made to each other on their way out (e.g. the application's
        ``Handled`` to the retrier, which would otherwise be dispatched again after a restart).
        A crash does not drain: the next instance reads the mailbox."""
        if self._inbox.paused:
            return
        redeliver, sock = self._mailbox.redeliver, self._mailbox.socket
        for _ in range(DRAIN_LIMIT):
            if redeliver:
                frame = redeliver.popleft()
            else:
                try:
                    frame = _recv(sock, zmq.NOBLOCK)
                except zmq.Again:
                    break
            self._frame_turn(frame)

    def _actor_loop_running(self) -> None:
        # pykka's loop, except that a mailbox frame (bytes from the inbox) goes straight to
        # _frame_turn: no envelope, no future, no generic dispatch. This is the ask path.
        # Failures end the instance as in pykka (_handle_failure, then on_failure), but a
        # BaseException too is this actor's crash alone, never pykka's stop_all.
        get, stopped = self._inbox.get, self.actor_stopped.is_set
        while not stopped():
            item = get()
            try:
                if type(item) is bytes:
                    self._frame_turn(item)
                else:
                    self._envelope_turn(item)
            except BaseException:  # noqa: BLE001 - reported as this instance's crash
                self._handle_failure(*sys.exc_info())
                try:
                    self.on_failure(*sys.exc_info())
                except Exception:  # noqa: BLE001 - a failing on_stop is recorded, not raised
                    self._handle_failure(*sys.exc_info())

    def _envelope_turn(self, envelope: Any) -> None:
        """A control item (stop, timer, proxy call, watched pollable): a pykka asker gets
        the handler's exception on its future, as in pykka; otherwise it propagates."""
        try:
            response = self._handle_receive(envelope.message)
        except Exception:
            if envelope.reply_to is None:
                raise
            envelope.reply_to.set_exception()
            return
        if envelope.reply_to is not None:
            envelope.reply_to.set(response)

    def _frame_turn(self, frame: bytes) -> None:
        """One handler turn for a mailbox frame; the tells it made leave together when it ends
        (one frame per destination), before the next inbox item is read."""
        try:
            if self.batch_limit and not self._acknowledge:
                self._batch_turn(frame)
            else:
                self._on_frame(frame)
        except Exception as exc:
            self._fault_deferred(exc)
            self._flush_after(exc)
            raise
        except BaseException as exc:
            error = BaseExceptionInHandler(f"{type(exc).__name__}: {exc}")
            self._fault_deferred(error)
            self._flush_after(error)
            raise error from exc
        if self.sender._pending:
            self.sender.flush()

    def _fault_deferred(self, exc: BaseException) -> None:
        """Answer every ask still waiting with a FAULT naming ``exc`` (its asker must not hang)."""
        for token in list(self._deferred):
            try:
                token.fail(exc)
            except VillageMeshError as reply_error:
                exc.add_note(f"an asker could not be told of the crash: {reply_error}")

    def _handle_receive(self, message: Any) -> Any:
        # A control item's handler turn: its tells leave together when it ends.
        try:
            result = super()._handle_receive(message)
        except BaseException as exc:
            self._flush_after(exc)
            raise
        if self.sender._pending:
            self.sender.flush()
        return result

    def _flush_after(self, exc: BaseException) -> None:
        """Send what a failed turn held (its tells were made before it failed)."""
        try:
            self.sender.flush()
        except VillageMeshError as flush_error:
            exc.add_note(f"tells held by this turn could not be sent: {flush_error}")

    def _teardown(self) -> None:
        for timer in list(self._timers):
            timer.cancel()
        self._timers.clear()
        sender = getattr(self, "sender", None)
        if sender is not None:
            if self._deferred:
                self._fault_deferred(ActorStopped(f"actor {self.name!r} ended before answering"))
            sender.close()
        self._inbox.close()

    # -- the handler ---------------------------------------------------------------------------

    def handle(self, msg: Any) -> Any:
        """Handle one bus or timer message; for an ask, return the reply (or None)."""
        raise NotImplementedError(f"{type(self).__name__} does not handle {type(msg).__name__}")

    def handle_batch(self, batch: list[Request]) -> None:
        """Handle every message of one batch turn (only called when :attr:`batch_limit` is set).

        Answer each ask through its ``token`` (``token.reply(answer)``), now or in a later
        turn; a token left unanswered is kept, and faulted if the instance ends first.
        """
        raise NotImplementedError(f"{type(self).__name__} sets batch_limit but does not implement handle_batch")

    def defer_reply(self) -> ReplyToken:
        """In :meth:`handle` of an ask: answer later through the returned token, not by returning.

        Raises:
            BusError: the message being handled is not an ask.
        """
        if self._asking is None:
            raise BusError(f"actor {self.name!r}: defer_reply outside the handling of an ask")
        reply_to, correlation = self._asking
        self._asking = None
        token = self._taken = ReplyToken(self, reply_to, correlation)
        self._deferred.add(token)
        return token

    def _dispatch(self, message: Any) -> Any:
        kind = type(message)
        if kind is _TimerFired:
            self._timers.discard(message.handle)
            return self.handle(message.message)
        return super()._dispatch(message)

    def _on_frame(self, frame: bytes) -> None:
        if self._acknowledge:
            # A process child marks every frame it begins on a kernel-buffered socket
            # (the byte survives the child's death, unlike zmq's queues): if it dies
            # before the ack, its host knows which frame was in progress.
            self.ctx.bus.control.sendall(b"B")
        try:
            kind, correlation, reply_to, msg = busmod.decode_frame(frame, trusted=True)
        except CodecError as exc:
            self._reject(str(exc))
            return
        if self._metered:
            self.metrics.received += len(msg) if kind is _BATCH else 1
        if kind is _TELL:
            if type(msg) is InjectedCrash:
                raise CrashInjected(msg.reason)
            self.handle(msg)
            if self._acknowledge:
                self.sender.uplink(b"ack")
        elif kind is _ASK and reply_to is not None:
            self._asking, self._taken = (reply_to, correlation), None
            try:
                if type(msg) is InjectedCrash:
                    raise CrashInjected(msg.reason)
                answer = self.handle(msg)
            except BaseException as exc:
                if self._taken is None:  # a deferred token is faulted with the others
                    self.sender.reply(
                        reply_to, correlation, busmod.Fault(self.name, type(exc).__name__, str(exc)), fault=True
                    )
                raise
            finally:
                self._asking = None
            if self._taken is not None:  # the handler keeps the token: it answers later
                self._taken = None
                return
            sent = _perf_counter()
            self.sender.reply(reply_to, correlation, _OK if answer is None else answer)
            # A reply sent quickly means the asker has not run since: it waits (on another
            # CPU, or on this one after us), so the mailbox is most likely empty and the
            # inbox should wait at once. A slow one means this thread was preempted while
            # the asker ran, which has probably asked again: the inbox reads first.
            self._inbox.idle = _perf_counter() - sent < QUICK_REPLY_S
            if self._acknowledge:
                self.sender.uplink(b"ack")
        elif kind is _BATCH:
            self._on_batch(msg)
        else:
            self._reject(f"unexpected {kind.name} frame")

    def _on_batch(self, batch: tuple[Any, ...]) -> None:
        handle, build = self._handle_one, codec.from_values
        for index, values in enumerate(batch):
            try:
                handle(build(values, trusted=True))
            except BaseException:
                # The rest of the batch was never handled: it goes back to the mailbox,
                # ahead of everything else, for the next instance.
                rest = [busmod.tell_frame(v) for v in batch[index + 1 :]]
                self._mailbox.redeliver.extendleft(reversed(rest))
                raise

    def _batch_turn(self, first: bytes) -> None:
        """Take ``first`` and every frame already waiting (up to :attr:`batch_limit` messages) as one turn.

        Never waits for more. An :class:`InjectedCrash` ends the batch before it: the
        messages ahead are handled, then the crash frame and the rest go back to the
        mailbox's front, and the next turn begins with the crash.
        """
        limit, redeliver, sock = self.batch_limit, self._mailbox.redeliver, self._mailbox.socket
        build = codec.from_values
        batch: list[Request] = []
        frame: bytes | None = first
        while frame is not None:
            try:
                kind, correlation, reply_to, msg = busmod.decode_frame(frame, trusted=True)
            except CodecError as exc:
                self._reject(str(exc))
                kind = None
            if kind is _TELL:
                if type(msg) is InjectedCrash:
                    if not batch:
                        raise CrashInjected(msg.reason)
                    redeliver.appendleft(frame)
                    break
                batch.append(Request(msg, None))
            elif kind is _ASK and reply_to is not None:
                token = ReplyToken(self, reply_to, correlation)
                self._deferred.add(token)
                batch.append(Request(msg, token))
                if type(msg) is InjectedCrash:
                    if len(batch) == 1:
                        raise CrashInjected(msg.reason)
                    batch.pop()
                    self._deferred.discard(token)
                    redeliver.appendleft(frame)
                    break
            elif kind is _BATCH:
                batch.extend(Request(build(values, trusted=True), None) for values in msg)
            elif kind is not None:
                self._reject(f"unexpected {kind.name} frame")
            if len(batch) >= limit:
                break
            if redeliver:
                frame = redeliver.popleft()
            else:
                try:
                    frame = _recv(sock, _NOBLOCK)
                except zmq.Again:
                    frame = None
        if batch:
            if self._metered:
                self.metrics.received += len(batch)
            self.handle_batch(batch)

    def _handle_one(self, msg: Any) -> Any:
        if type(msg) is InjectedCrash:
            raise CrashInjected(msg.reason)
        return self.handle(msg)

    def _reject(self, reason: str) -> None:
        self.ctx.log.emit("message_rejected", level="warning", actor=self.name, reason=reason)
        self._acknowledged()

    def _acknowledged(self) -> None:
        if self._acknowledge:
            self.sender.uplink(b"ack")

    # -- what handlers use -----------------------------------------------------------------------

    def tell(self, to: str, msg: object, *, timeout: float | None = None) -> None:
        """Send ``msg`` to the actor named ``to`` (MailboxFull after ``timeout``)."""
        self.sender.tell(to, msg, timeout=timeout)

    def ask(self, to: str, msg: object, *, timeout: float) -> Any:
        """Request/reply with another actor. Blocks this actor: prefer tell + a reply message."""
        return self.sender.ask(to, msg, timeout=timeout)

    def schedule(self, delay: float, msg: object) -> TimerHandle:
        """Deliver ``msg`` to this instance's :meth:`handle` after ``delay`` seconds."""
        fired = _TimerFired(msg)
        handle = fired.handle = self.ctx.scheduler.call_later(delay, self._fire, fired)
        self._timers.add(handle)
        return handle

    def _fire(self, fired: _TimerFired) -> None:
        try:
            self.actor_ref.tell(fired)
        except pykka.ActorDeadError:
            # The instance ended between the timer's deadline and now: its timers die with it.
            return


class TimerHandle:
    """A scheduled call; :meth:`cancel` it to stop it firing."""

    __slots__ = ("args", "cancelled", "deadline", "fn")

    def __init__(self, deadline: float, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.deadline = deadline
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        """The call will not happen (if it has not already)."""
        self.cancelled = True


class Scheduler:
    """One timer thread per node: runs short calls (pykka ``tell``\\s) at their deadlines."""

    def __init__(self, name: str = "scheduler") -> None:
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> TimerHandle:
        """Call ``fn(*args)`` in the timer thread after ``delay`` seconds."""
        handle = TimerHandle(time.monotonic() + max(0.0, delay), fn, args)
        with self._cond:
            heapq.heappush(self._heap, (handle.deadline, next(self._seq), handle))
            self._cond.notify()
        return handle

    def _run(self) -> None:
        name_this_thread()
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    # A far deadline (an extreme TTL) is waited for in steps: Condition.wait
                    # refuses timeouts beyond threading.TIMEOUT_MAX (OverflowError).
                    wait = min(self._heap[0][0] - time.monotonic(), _MAX_TIMER_WAIT_S) if self._heap else None
                    self._cond.wait(wait)
                if self._stopped:
                    return
                _, _, handle = heapq.heappop(self._heap)
            if not handle.cancelled:
                handle.fn(*handle.args)

    def close(self) -> None:
        """Stop the thread; pending calls are dropped."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=2.0)
