"""The shell every I/O actor shares: one asyncio loop thread it owns, and a safe way back.

Bus sockets may only be used from the actor's own thread, and asyncio objects
only from the loop's. :class:`LoopActor` is the bridge, for the acceptor, the
WebSocket and the LAN actors alike::

    actor thread ──run_on_loop(coro, then)──▶ loop thread runs coro
                 ◀── pykka queue: _LoopResult ─┘  then(result, error) runs in the actor thread
    loop callback ──post(msg)──▶ pykka queue ──▶ on_loop_message(msg) in the actor thread

The loop thread is started with :meth:`~villagemesh.actors.core.base.Supervised.spawn_thread`,
so its death crashes the actor and the supervisor restarts it. Values posted
after the instance ended are dropped: its successor starts clean.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pykka

from villagemesh.actors.core.base import Actor
from villagemesh.actors.core.bus import ZERO_COPY_BYTES, Sender
from villagemesh.actors.core.handoff import (
    HANDSHAKE_DEADLINE_S,
    HandedOff,
    ProtocolFactory,
    RefusalLog,
    Route,
    adopt,
    claim,
)
from villagemesh.actors.core.loopthread import EventLogLogger, LoopThread
from villagemesh.actors.core.transport import ConnectionHandedOff, ReceivedMany
from villagemesh.errors import BusError, MailboxFull, NoSuchActor

__all__ = ["DIRECT_MAX_BYTES", "LOOP_CALL_TIMEOUT_S", "EnvelopeTransportActor", "LoopActor"]

LOOP_CALL_TIMEOUT_S = 5.0
"""Starting, stopping or reading counters on the loop takes milliseconds; 5 s means it is stuck."""

DIRECT_MAX_BYTES = ZERO_COPY_BYTES
"""Envelopes under this size may be told by the loop thread itself; a larger one (a transfer's chunk)
goes through the actor thread, so the loop does not spend its time packing it and goes on reading."""


@dataclass(frozen=True, slots=True)
class _LoopResult:
    then: Callable[[Any, BaseException | None], None]
    result: Any
    error: BaseException | None


async def _cancel_remaining() -> None:
    """Cancel every task still on the loop (probes, sends in progress) and wait for them,
    so none is destroyed pending when the loop closes."""
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class LoopActor(Actor):
    """An actor owning one event loop thread.

    Subclasses call :meth:`start_io` early in ``on_start`` and put their
    closing in :meth:`io_shutdown`; it runs on every exit, a failed start included.
    """

    io_loop: LoopThread
    io_log: EventLogLogger
    _refusals: RefusalLog | None = None
    """Handshake deadlines missed by adopted connections (made on the loop at the first)."""

    def start_io(self) -> None:
        """Start the loop thread (owned: its death crashes this actor) and the log front."""
        self.io_log = EventLogLogger(self.ctx.log, actor=self.name)
        self.io_loop = LoopThread(f"{self.name}-loop")
        self.io_loop.start(lambda target, name: self.spawn_thread(target, name=name))

    async def io_shutdown(self) -> None:
        """Close this actor's I/O objects, on the loop. Subclasses: tolerate a half-done ``on_start``."""

    def on_stop(self) -> None:
        """Close the I/O and stop the loop thread."""
        self._stop_io_once()

    def _teardown(self) -> None:
        # Every exit path passes here, including an on_start that failed after
        # start_io (pykka then skips on_stop): the loop thread and its sockets go too.
        try:
            self._stop_io_once()
        finally:
            super()._teardown()

    def _stop_io_once(self) -> None:
        io_loop = getattr(self, "io_loop", None)
        if io_loop is None or io_loop.loop.is_closed():
            return
        try:
            if io_loop.loop.is_running():
                io_loop.call(self.io_shutdown(), LOOP_CALL_TIMEOUT_S)
        finally:
            try:
                if io_loop.loop.is_running():
                    io_loop.call(_cancel_remaining(), LOOP_CALL_TIMEOUT_S)
            finally:
                io_loop.stop()

    def tell_or_log(self, to: str | None, msg: object) -> None:
        """Tell ``to`` (nobody if None); a refusal of the bus is logged as ``send_outcome_undeliverable``,
        since an outcome nobody can take must not crash the transport that made it."""
        if to is None:
            return
        try:
            self.tell(to, msg)
        except BusError as exc:
            self.io_log.warning("send_outcome_undeliverable", to=to, reason=str(exc))

    def post(self, msg: object) -> bool:
        """From the loop thread: hand ``msg`` to :meth:`on_loop_message` in the actor thread.

        False when the instance has ended (``msg`` is dropped; its successor starts clean)."""
        try:
            self.actor_ref.tell(msg)
        except pykka.ActorDeadError:
            return False
        return True

    def run_on_loop(
        self,
        coro: Coroutine[Any, Any, Any],
        then: Callable[[Any, BaseException | None], None],
        *,
        post_success: bool = True,
        post_if: Callable[[Any], bool] | None = None,
    ) -> None:
        """Start ``coro`` on the loop; ``then(result, error)`` runs later in the actor thread.

        ``post_success=False``: ``then`` runs only for an error (or a cancellation), or for
        a result ``post_if`` accepts; any other result is dropped on the loop thread,
        without a hop to the actor.
        """

        def done(future: concurrent.futures.Future[Any]) -> None:
            if future.cancelled():
                self.post(_LoopResult(then, None, asyncio.CancelledError("cancelled on the loop")))
            else:
                error = future.exception()
                if error is None and not post_success and (post_if is None or not post_if(future.result())):
                    return
                self.post(_LoopResult(then, None if error is not None else future.result(), error))

        asyncio.run_coroutine_threadsafe(coro, self.io_loop.loop).add_done_callback(done)

    def adopt_handed_off(self, msg: ConnectionHandedOff, factory: ProtocolFactory) -> None:
        """Serve a connection the acceptor handed over, on this actor's loop (peeked bytes first).

        Its slot in the node's limiter (held under its descriptor) becomes this loop's: it
        is given back when the connection is lost. Its first complete message must arrive
        within ``handshake_deadline_s`` (config; :data:`~.handoff.HANDSHAKE_DEADLINE_S`).
        """
        release = claim(msg.fd)
        handed = HandedOff(socket.socket(fileno=msg.fd), msg.peeked, msg.peer, Route(msg.route), release)
        deadline = float(self.ctx.config.get("handshake_deadline_s", HANDSHAKE_DEADLINE_S))

        def adopted(_: Any, error: BaseException | None) -> None:
            if error is not None:
                if release is not None:
                    release()  # once only: adopt may have given it back already
                self.io_log.warning(
                    "connection_rejected",
                    peer=msg.peer,
                    reason=f"adoption failed: {error}",
                    protocol=msg.route,
                    peeked_bytes=len(msg.peeked),
                )

        self.run_on_loop(adopt(handed, factory, deadline_s=deadline, on_late=self._late), adopted, post_success=False)

    def _late(self, handed: HandedOff, reason: str) -> None:
        """On the loop: an adopted connection missed its handshake deadline (counted, rate-limited)."""
        if self._refusals is None:
            self._refusals = RefusalLog(self.io_log)
        src = handed.peer.rsplit(":", 1)[0]
        self._refusals.refuse(
            "handshake",
            src,
            peer=handed.peer,
            reason=reason,
            protocol=handed.route.value,
            peeked_bytes=len(handed.peeked),
        )

    def on_receive(self, message: Any) -> Any:
        """Results of :meth:`run_on_loop`, then :meth:`on_loop_message` for posted values."""
        if type(message) is _LoopResult:
            message.then(message.result, message.error)
            return None
        return self.on_loop_message(message)

    def on_loop_message(self, message: Any) -> None:
        """A value :meth:`post`-ed from the loop thread; subclasses handle theirs."""
        raise NotImplementedError(f"{type(self).__name__} got an unexpected {type(message).__name__} from its loop")


class EnvelopeTransportActor(LoopActor):
    """A transport's loop actor: envelopes its loop decoded go to ``deliver_to`` as ``ReceivedMany``.

    Batches, never waiting to fill one: every envelope one pass of the loop's callbacks
    hands to :meth:`envelope_received` goes on to ``deliver_to`` as one ``ReceivedMany``
    (``call_soon``, no timer). A pass of small envelopes (each under
    :data:`DIRECT_MAX_BYTES`) is told by the loop thread itself, through a bus sender
    of its own that never waits: one thread hop fewer on every message's way in. A pass
    with a large one (a transfer's chunk), or one the mailbox cannot take at once (full,
    or ``deliver_to`` restarting), comes back to the actor thread, which tells it and
    waits for room, so the loop never blocks and goes on reading.

    **Arrival order is kept.** Both threads tell through the same sender (one socket, so
    one ordered pipe into the mailbox), taking turns under a lock, and while a pass handed
    to the actor thread is not yet told, later passes follow it there instead of
    overtaking it. (Two sockets would not do: the mailbox reads its pipes in turn, so a
    frame sent later on one can be read before one sent earlier on the other.) Subclasses
    set ``transport`` (the contract's name) and call :meth:`start_inbound` in ``on_start``.
    """

    transport: str = ""
    deliver_to: str | None = None
    dropped = 0
    """Envelopes received with no ``deliver_to`` to give them to (counted, dropped)."""

    def start_inbound(self, deliver_to: str | None) -> None:
        self.deliver_to = deliver_to
        self.dropped = 0
        self._inbound: list[tuple[bytes, str]] = []
        """Envelopes decoded on the loop and not yet posted (loop thread only)."""
        self._loop_sender: Sender | None = None
        """The sender of every ReceivedMany (made on first use; used by one thread at a time, under
        ``_send_lock``; closed once the loop stopped)."""
        self._send_lock = threading.Lock()
        self._posted_lock = threading.Lock()
        self._posted = 0
        """Passes handed to the actor thread and not yet told (under ``_posted_lock``)."""
        self.told_from_loop = 0
        """Envelopes the loop thread told ``deliver_to`` itself (the others went through the actor thread)."""

    def _inbound_sender(self) -> Sender:
        """The one sender of ReceivedMany frames (call with ``_send_lock`` held)."""
        sender = self._loop_sender
        if sender is None:
            sender = self._loop_sender = Sender(self.ctx.bus, owner=self.name)
        return sender

    def envelope_received(self, message: object, raw: bytes, peer_id: str) -> None:
        """On the loop thread: ``raw`` came from the authenticated ``peer_id``; pass it on with this pass's others."""
        if not self._inbound:
            self.io_loop.loop.call_soon(self._post_inbound)
        self._inbound.append((raw, peer_id))

    def _post_inbound(self) -> None:
        inbound, self._inbound = self._inbound, []
        small = all(len(raw) < DIRECT_MAX_BYTES for raw, _ in inbound)
        # Only this thread adds to _posted: 0 read here stays 0 until this thread posts.
        if self.deliver_to is not None and small and self._posted == 0 and self._send_lock.acquire(blocking=False):
            try:
                self._inbound_sender().tell(self.deliver_to, self._received(inbound), timeout=0)
            except (MailboxFull, NoSuchActor):
                told = False  # not now: the actor thread tells them and waits for room
            else:
                told = True
            finally:
                self._send_lock.release()
            if told:
                self.told_from_loop += len(inbound)
                return
        with self._posted_lock:
            self._posted += 1
        self.post(inbound)

    def _received(self, inbound: list[tuple[bytes, str]]) -> ReceivedMany:
        return ReceivedMany(self.transport, tuple(raw for raw, _ in inbound), tuple(peer for _, peer in inbound))

    def _stop_io_once(self) -> None:
        try:
            super()._stop_io_once()
        finally:
            sender, self._loop_sender = getattr(self, "_loop_sender", None), None
            if sender is not None:  # the loop thread has ended: nobody else uses it
                sender.close()

    def on_loop_message(self, message: Any) -> None:
        """Envelopes from authenticated peers (senders checked): tell ``deliver_to`` (one frame for all),
        on the loop's sender, waiting for room as long as the bus's send timeout."""
        try:
            if self.deliver_to is None:
                self.dropped += len(message)
                return
            with self._send_lock:
                self._inbound_sender().tell(self.deliver_to, self._received(message))
        finally:
            with self._posted_lock:
                self._posted -= 1
