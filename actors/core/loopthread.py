"""An asyncio event loop in one background thread, with a thread-safe edge.

The I/O layers (acceptor, WebSocket transport, LAN beacons) are asyncio code;
their owners (actors) are threads. Each layer gets one :class:`LoopThread`:
the loop runs in a thread the owner starts (an actor passes its
``spawn_thread`` so the thread's death crashes the actor), and the owner talks
to the loop only through :meth:`LoopThread.call` (run a coroutine, wait with a
timeout) and :meth:`LoopThread.call_soon` (fire and forget)::

    owner thread ──call(coro, timeout)──▶ run_coroutine_threadsafe ──▶ loop thread
                 ◀──────── result / exception / TransportTimeout ─────┘

Nothing else crosses: callbacks out of the loop (``on_message``, ``on_peer``)
run in the loop thread and must only hand data on (a queue, a ``tell``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from villagemesh.errors import TransportTimeout

__all__ = ["EventLogLogger", "LoopThread", "Spawn"]

T = TypeVar("T")

Spawn = Callable[[Callable[[], None], str], threading.Thread]
"""Starts ``target`` in a new thread named ``name`` and returns the thread."""

_STOP_JOIN_S = 5.0
"""How long :meth:`LoopThread.stop` waits for the loop thread; a loop that ignores stop is a bug."""


def _plain_spawn(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


class LoopThread:
    """One event loop running in one thread, driven from other threads."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._running = threading.Event()

    def start(self, spawn: Spawn | None = None) -> None:
        """Start the loop in a thread made by ``spawn`` (a plain daemon thread by default)."""
        self._thread = (spawn or _plain_spawn)(self._run, self.name)
        self._running.wait(_STOP_JOIN_S)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._running.set)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and return its result; TransportTimeout after ``timeout`` s."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise TransportTimeout(f"{self.name}: no result within {timeout} s") from exc

    def call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon (thread-safe, no result)."""
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        """Stop the loop, wait for its thread, close the loop. Run your async shutdown first."""
        if self.loop.is_closed():
            return
        if self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(_STOP_JOIN_S)
        if not self.loop.is_running():
            self.loop.close()


class EventLogLogger:
    """A structlog-shaped front (``info(event, **keys)``...) for the node's :class:`EventLog`.

    The I/O layers log through structlog's interface; inside a node their
    events belong in the node's event log, so an actor passes one of these.
    Debug events are dropped (per-connection chatter has no place in the node
    log); ``is_enabled_for`` says so, which lets the acceptor skip building them.
    """

    def __init__(self, log: Any, **bound: Any) -> None:
        self._log = log
        self._bound = bound

    def bind(self, **more: Any) -> EventLogLogger:
        """A logger adding ``more`` keys to every event."""
        return EventLogLogger(self._log, **self._bound, **more)

    def is_enabled_for(self, level: int) -> bool:
        """Only INFO and above reach the event log."""
        return level >= logging.INFO

    def debug(self, event: str, **keys: Any) -> None:
        """Dropped."""

    def info(self, event: str, **keys: Any) -> None:
        """An info event."""
        self._log.emit(event, level="info", **self._bound, **keys)

    def warning(self, event: str, **keys: Any) -> None:
        """A warning event."""
        self._log.emit(event, level="warning", **self._bound, **keys)

    def error(self, event: str, **keys: Any) -> None:
        """An error event."""
        self._log.emit(event, level="error", **self._bound, **keys)
