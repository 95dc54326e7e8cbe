"""The node's asyncio face: every call a coroutine, bridged to the actors without threads.

::

    async with AsyncNode(create_network("hybrid", data_dir=...)) as node:
        await node.wait_for_peers(1, timeout=10)
        reply = await node.request(peer_id, {"task": 1}, timeout=5)
        async for message in node.messages("DATA"):
            ...

How a coroutine reaches an actor: it tells the actor a message from the
loop's own thread (a non-blocking ZeroMQ push; a full mailbox makes it await
and push again: backpressure, never a blocked loop), and awaits a future that
the answer resolves with ``loop.call_soon_threadsafe``. Sends are told to the
retrier, whose refusals come back as the handle's end; queries (peers,
statuses) go through the app gateway (:class:`~villagemesh.actors.app.messages.BridgeQuery`).
No executor thread is used, except by :meth:`AsyncNode.start` and
:meth:`AsyncNode.stop`, which start and join the node's own threads, and by the
transfers (:meth:`AsyncNode.send_file`, :meth:`AsyncNode.send_stream`), whose
hashing and spooling are file I/O that must not block the loop.

Where handlers run: ``async def`` handlers (and coroutines a plain handler
returns) run on the loop they were subscribed from; plain handlers run on the
node's app gateway thread.

Cancellation (asyncio's ``task.cancel()``, ``asyncio.timeout``): a cancelled
:meth:`AsyncNode.send` either never handed its message over (it was
waiting for room in the outbox: nothing is sent, the message is withdrawn)
or had already returned its handle: the hand-off is the call's last step and
no ``await`` follows it. A cancelled :meth:`AsyncNode.request` stops waiting;
its reply, if one comes, is dropped and counted (``late_replies``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from villagemesh.actors.app.messages import BridgeQuery
from villagemesh.actors.app.state import DeliveryHandle, DeliveryStatus, InboundMessage, MessageId, call_on_loop
from villagemesh.actors.core.envelopes import remember
from villagemesh.actors.retrier.messages import DeliverMany
from villagemesh.errors import (
    ActorCrashed,
    AskTimeout,
    BusError,
    MailboxFull,
    NoSuchActor,
    OutboxFull,
    RequestTimeout,
    VillageMeshError,
)
from villagemesh.node import (
    ASK_TIMEOUT,
    DEFAULT_TTL,
    FILE_KIND,
    REQUEST_KIND,
    SEND_MANY_CHUNK,
    Handler,
    Node,
    NodeEvent,
    PeerInfo,
    PriorityLike,
    ReceivedFile,
    TransferHandle,
    _peer_info,
    _Spool,
    _unknown_outcome,
    check_min_count,
    check_peer_id,
)
from villagemesh.protocols.envelope import Priority, encode_message

__all__ = ["DEFAULT_MESSAGE_QUEUE", "AsyncNode", "ended"]

DEFAULT_MESSAGE_QUEUE = 100
"""Messages :meth:`AsyncNode.messages` holds before its handler waits (and the senders with it)."""

DEFAULT_EVENT_QUEUE = 1000
"""Events :meth:`AsyncNode.events` holds; beyond it the oldest are dropped and counted."""

PUSH_RETRY = 0.001
"""Seconds between two pushes into a full mailbox (doubling up to 50 ms)."""

BATCHES_OUT = 4
"""Batches of asyncio sends one loop has handed to a node's retrier and not had answered, at most.
The sends behind them gather into the next batches (up to ``SEND_MANY_CHUNK`` each), so a burst
is stored in few large commits and never queues deep in the retrier's mailbox, where a batch's
wait for its answer would include every batch ahead of it."""

SENDS_PER_TURN = 8
"""Sends one turn of the event loop prepares at most (about 60 µs each); the others wait
for the next turn, so a thousand concurrent sends never hold a timer back by more than
about a millisecond of the loop's own work (benchmarks/asyncio_ticker.py)."""


class AsyncNode:
    """A :class:`~villagemesh.node.Node` seen from asyncio. Make one from a node, or with
    ``async with create_network(...) as node`` (which yields the Node; ``node.aio`` is this)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.dropped_events = 0
        """Events :meth:`events` dropped because its reader fell ``maxsize`` behind."""
        self._sending: tuple[asyncio.AbstractEventLoop, _Pacer, _Room, _Outlet] | None = None
        """The last loop that sent and its pacer, room and outlet (looked up once per loop, not per send)."""

    # -- identity and lifecycle ----------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self.node.node_id

    @property
    def name(self) -> str:
        """This node's name."""
        return self.node.name

    @property
    def acceptor_address(self) -> str:
        """``host:port`` other nodes bootstrap from."""
        return self.node.acceptor_address

    async def start(self) -> AsyncNode:
        """Start the node (its threads are started and joined in an executor: the one thread use)."""
        await asyncio.to_thread(self.node.start)
        return self

    async def stop(self) -> None:
        """Stop the node."""
        await asyncio.to_thread(self.node.stop)

    async def __aenter__(self) -> AsyncNode:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- sending ---------------------------------------------------------------------------------

    async def send(
        self,
        peer_id: str,
        payload: object,
        *,
        kind: str = "DATA",
        priority: PriorityLike = Priority.NORMAL,
        ttl: float = DEFAULT_TTL,
        correlation_id: bytes | None = None,
        timeout: float | None = None,
        message_id: MessageId | bytes | None = None,
    ) -> DeliveryHandle:
        """Send ``payload`` reliably; returns the handle once the message is stored durably.

        Awaits room in a full outbox (up to ``timeout`` seconds, None: as long as
        it takes), then the commit that stores it, as :meth:`Node.send
        <villagemesh.node.Node.send>` does: a crash of the process after this
        returns does not lose the message. The sends of one loop turn are handed
        to the retrier together and stored in one commit (the group commit of
        ``Node.send_many``). A refusal by the retrier ends the handle FAILED;
        ``await handle`` gives the end. ``message_id``: the idempotent resend of
        ``Node.send``. If the retrier crashes while storing, the same envelopes are
        handed over again (at its restart) until ``NodeConfig.send_timeout``.

        Cancelled before its turn's hand-off, nothing is sent (the message is
        withdrawn); cancelled after it, while the commit is awaited, the message
        goes on (it is stored, and its handle ends as any other's: the node's
        events report it).

        Raises:
            ConfigError: at once, for a malformed id, this node's own id, or a bad value.
            OutboxFull: no room within ``timeout``.
            BusError: the retrier did not answer within ``send_timeout`` (the outcome is
                unknown: send again with the same ``message_id``).
        """
        node = self.node
        loop = asyncio.get_running_loop()
        sending = self._sending
        if sending is None or sending[0] is not loop:
            sending = self._sending = (loop, _pacer(loop), _room(loop, node), _outlet(loop, node))
        _, pacer, room, outlet = sending
        await pacer.turn()  # cancelled here: nothing was made or sent
        message = node.envelope(
            peer_id,
            payload,
            kind=kind,
            priority=priority,
            ttl=ttl,
            correlation_id=correlation_id,
            message_id=message_id,
        )
        node._client()  # raises at once for a node that is not running or has failed
        deadline = None if timeout is None else loop.time() + timeout
        handle = await room.admit(message.id, peer_id, len(message.payload), deadline, timeout)
        envelope = encode_message(message)
        remember(envelope, message)  # the retrier and the secure session read it back without decoding
        batch, stored = outlet.put(envelope)
        try:
            error = await stored
        except BaseException as exc:
            if not batch.pushed:  # cancelled (or the bus refused) before the hand-off: withdrawn
                node.handles.resolve(message.id, False, 0, f"withdrawn before the hand-off: {type(exc).__name__}")
            elif isinstance(exc, BusError):  # handed over, never answered: it may be stored
                node.handles.resolve(message.id, False, 0, _unknown_outcome(message.id, exc))
            raise  # (cancelled after the hand-off: the message goes on, its handle ends as usual)
        if error is not None:
            node.handles.resolve(message.id, False, 0, f"refused: {error}")
        return handle

    async def request(
        self,
        peer_id: str,
        payload: object,
        *,
        timeout: float,
        kind: str = REQUEST_KIND,
        priority: PriorityLike = Priority.NORMAL,
    ) -> Any:
        """Send ``payload`` and return the reply (what the peer's handler returned, decoded).

        Raises:
            RequestTimeout: no reply within ``timeout`` (names the peer and the message id).
            RemoteError: the peer's handler raised (type and message).
            Unhandled: the peer has no handler for ``kind``.
            DeliveryFailed: the request never reached a handler.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        handle = await self.send(peer_id, payload, kind=kind, priority=priority, ttl=timeout, timeout=timeout)
        try:
            status = await asyncio.wait_for(_status_of(handle), max(0.0, deadline - loop.time()))
        except TimeoutError:
            self.node.handles.abandon(handle.raw_id)
            raise RequestTimeout(peer_id, handle.message_id, timeout) from None
        except asyncio.CancelledError:
            self.node.handles.abandon(handle.raw_id)
            raise
        return self.node._reply_of(handle, status, timeout)

    async def broadcast(
        self,
        kind: str,
        payload: object,
        *,
        priority: PriorityLike = Priority.NORMAL,
        ttl: float = DEFAULT_TTL,
        timeout: float | None = None,
    ) -> list[DeliveryHandle]:
        """Send to every known peer (one reliable message each)."""
        return [
            await self.send(p.peer_id, payload, kind=kind, priority=priority, ttl=ttl, timeout=timeout)
            for p in await self.peers()
        ]

    # -- large transfers -------------------------------------------------------------------------

    async def send_file(
        self, peer_id: str, path: str | os.PathLike[str], *, kind: str = FILE_KIND, name: str | None = None
    ) -> TransferHandle:
        """:meth:`Node.send_file <villagemesh.node.Node.send_file>` (hashed on an executor thread);
        ``await handle`` for its end."""
        return await asyncio.to_thread(functools.partial(self.node.send_file, peer_id, path, kind=kind, name=name))

    async def send_stream(
        self,
        peer_id: str,
        source: AsyncIterable[bytes] | Iterable[bytes],
        *,
        size: int | None = None,
        kind: str = FILE_KIND,
        name: str = "stream",
    ) -> TransferHandle:
        """:meth:`Node.send_stream <villagemesh.node.Node.send_stream>` for an async (or plain) iterable:
        read on the loop, spooled on an executor thread, then offered."""
        check_peer_id(peer_id, self.node.node_id)
        if not isinstance(source, AsyncIterable):
            send = functools.partial(self.node.send_stream, peer_id, source, size=size, kind=kind, name=name)
            return await asyncio.to_thread(send)
        spool = await asyncio.to_thread(_Spool, self.node.config.data_dir, self.node.transfer_digest)
        try:
            async for block in source:
                await asyncio.to_thread(spool.write, block)
            path, digest = await asyncio.to_thread(spool.close, size)
        except BaseException:
            spool.discard()
            raise
        offer = functools.partial(
            self.node._offer, peer_id, path, os.path.getsize(path), digest, kind, name, spooled=True
        )
        return await asyncio.to_thread(offer)

    def on_transfer(self, handler: Callable[[ReceivedFile], object], kind: str = "*") -> Callable[[], None]:
        """:meth:`Node.on_transfer <villagemesh.node.Node.on_transfer>` (an ``async def`` runs on this loop)."""
        return self.node.on_transfer(handler, kind)

    async def transfers(self) -> list[dict[str, Any]]:
        """:meth:`Node.transfers <villagemesh.node.Node.transfers>`."""
        return await asyncio.to_thread(self.node.transfers)

    # -- receiving -------------------------------------------------------------------------------

    def subscribe(self, kind: str, handler: Handler) -> Callable[[], None]:
        """:meth:`Node.subscribe <villagemesh.node.Node.subscribe>` (an ``async def`` runs on this loop)."""
        return self.node.subscribe(kind, handler)

    async def messages(
        self, kind: str = "*", *, maxsize: int = DEFAULT_MESSAGE_QUEUE
    ) -> AsyncGenerator[InboundMessage, None]:
        """Every message of ``kind`` from now on, through a queue of ``maxsize``.

        While the queue is full, the handler feeding it waits, so the message's
        outcome (and its sender's handle, which holds room in the sender's
        outbox) waits too: a slow consumer slows its senders down instead of
        filling memory. When the iteration ends, messages still waiting for
        room are reported to their senders as failed (the consumer is gone).
        """
        queue: asyncio.Queue[InboundMessage] = asyncio.Queue(maxsize)
        waiting: set[asyncio.Task[Any]] = set()
        closed = False

        async def put(message: InboundMessage) -> None:
            if closed:
                raise ConsumerGone(f"the messages({kind!r}) consumer has stopped")
            task = asyncio.current_task()
            assert task is not None
            waiting.add(task)
            try:
                await queue.put(message)
            finally:
                waiting.discard(task)

        unsubscribe = self.node.subscribe(kind, put)
        try:
            while True:
                yield await queue.get()
        finally:
            closed = True
            unsubscribe()
            for task in waiting:
                task.cancel()

    async def events(self, *, maxsize: int = DEFAULT_EVENT_QUEUE) -> AsyncGenerator[NodeEvent, None]:
        """The node's public events (:class:`~villagemesh.node.NodeEvent`) from now on.

        Events are news, not messages: when ``maxsize`` are unread the oldest is
        dropped (``dropped_events`` counts them).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[NodeEvent] = asyncio.Queue(maxsize)

        def put(event: NodeEvent) -> None:
            if queue.full():
                queue.get_nowait()
                self.dropped_events += 1
            queue.put_nowait(event)

        def listener(event: NodeEvent) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(put, event)

        unsubscribe = self.node.on_event(listener)
        try:
            while True:
                yield await queue.get()
        finally:
            unsubscribe()

    # -- queries ----------------------------------------------------------------------------------

    async def _query(self, query: str, argument: int = 0) -> Any:
        token, future = self.node.bridge.register()
        try:
            await _push(self.node._client(), "app", BridgeQuery(token, query, argument))
            return await asyncio.wait_for(future, 2 * ASK_TIMEOUT)
        finally:
            self.node.bridge.forget(token)

    async def peers(self) -> list[PeerInfo]:
        """Every known peer."""
        reply = await self._query("peers")
        return [_peer_info(p) for p in reply.peers]

    async def get_suitable_evolution_peers(self, min_count: int = 1) -> list[PeerInfo]:
        """Every peer suitable for evolution, best first."""
        reply = await self._query("suitable_peers", check_min_count(min_count))
        return [_peer_info(p) for p in reply.peers]

    async def network_status(self) -> dict[str, Any]:
        """:meth:`Node.network_status <villagemesh.node.Node.network_status>`."""
        retrier = await self._query("retrier_status")
        actors = await self._query("actors")
        mix = await self._query("betanet_status") if self.node.runs_betanet else None
        mesh = await self._query("bitchat_status") if self.node.runs_bitchat else None
        return self.node._status(len(await self.peers()), retrier, actors, mix, mesh)

    async def wait_for_peers(self, count: int, timeout: float) -> bool:
        """True once at least ``count`` peers are known; woken by ``peer_discovered`` events, not polling."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        changed = asyncio.Event()

        def listener(event: NodeEvent) -> None:
            if event.kind == "peer_discovered":
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(changed.set)

        unsubscribe = self.node.on_event(listener)
        try:
            while True:
                changed.clear()
                if len(await self.peers()) >= count:
                    return True
                left = deadline - loop.time()
                if left <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):  # not wait_for: on 3.11 it can swallow a cancel
                        await changed.wait()
        finally:
            unsubscribe()

    def discover_now(self) -> None:
        """Start a discovery round now (a tell: nothing to await)."""
        self.node.discover_now()


async def ended(handles: Sequence[DeliveryHandle]) -> list[DeliveryStatus]:
    """Every handle's final status, in order: one future for all of them.

    ``asyncio.gather(*handles)`` works too, but makes one Task per handle, and
    the first steps of a thousand tasks run in one turn of the loop; this
    counts the ends down in the threads that end them (under a lock) and wakes
    the caller's loop once, at the last.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    if not handles:
        return []
    left = len(handles)
    lock = threading.Lock()

    def finish(_: None) -> None:  # on the loop
        if not done.done():
            done.set_result(None)

    def one_ended(_status: DeliveryStatus) -> None:  # in the thread that ended the handle
        nonlocal left
        with lock:
            left -= 1
            last = left == 0
        if last:
            call_on_loop(loop, finish, None)

    for handle in handles:
        handle.add_done_callback(one_ended)
    await done
    return [handle.status for handle in handles]


class ConsumerGone(Exception):
    """A ``messages()`` iteration ended while this message waited for room in its queue."""


class _Pacer:
    """At most :data:`SENDS_PER_TURN` sends per turn of one event loop; the rest queue, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.used = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.reset_pending = False

    async def turn(self) -> None:
        """Return in this turn if it has room, else in a later one."""
        self._reset_soon()
        if self.used < SENDS_PER_TURN and not self.waiters:
            self.used += 1
            return
        waiter: asyncio.Future[None] = self.loop.create_future()
        self.waiters.append(waiter)
        await waiter

    def _reset_soon(self) -> None:
        if not self.reset_pending:
            self.reset_pending = True
            self.loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self.reset_pending = False
        self.used = 0
        while self.waiters and self.used < SENDS_PER_TURN:
            waiter = self.waiters.popleft()
            if not waiter.done():  # (a cancelled sender left its place)
                waiter.set_result(None)
                self.used += 1
        if self.waiters or self.used:
            self._reset_soon()


_PACERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pacer] = weakref.WeakKeyDictionary()


class _Room:
    """The asyncio senders of one loop waiting for room in one node's send window.

    They wait in arrival order, one queue per peer, and the window wakes the loop
    once per freed room, not once per waiter: when each waiter registered its own
    wake-up, every freed slot woke all of them (1,000 senders waiting: a million
    wake-ups to drain them; 2,000 gathered sends ran at 591 msg/s where 1,000 ran
    at 3,100 msg/s, benchmarks/delivery.py).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, node: Node) -> None:
        self.loop = loop
        self.handles = node.handles
        self.queues: dict[str, collections.deque[tuple[asyncio.Future[DeliveryHandle], bytes, int]]] = {}
        self.full: dict[str, str] = {}
        """The bound each peer's first waiter met last (what OutboxFull says)."""
        self.armed = False

    async def admit(
        self, message_id: bytes, peer_id: str, size: int, deadline: float | None, timeout: float | None
    ) -> DeliveryHandle:
        """A handle taking room in the window, in turn behind the sends already waiting for this peer.

        Raises:
            OutboxFull: no room before ``deadline`` (loop time; None: wait as long as it takes).
        """
        if peer_id not in self.queues:
            handle = self.handles.try_new(message_id, peer_id, size)
            if isinstance(handle, DeliveryHandle):
                return handle
            self.full[peer_id] = handle
        future: asyncio.Future[DeliveryHandle] = self.loop.create_future()
        self.queues.setdefault(peer_id, collections.deque()).append((future, message_id, size))
        try:
            self._pump()  # room freed meanwhile
            left = None if deadline is None else deadline - self.loop.time()
            if not future.done() and (left is None or left > 0):
                await asyncio.wait((future,), timeout=left)  # cancelled here: nothing was sent
        except BaseException:
            self._withdraw(future, message_id, "cancelled while waiting for room")
            raise
        if future.done():
            return future.result()
        future.cancel()  # its place is skipped from now on
        self._pump()  # the senders behind it may fit where it did not
        raise OutboxFull(peer_id, self.full.get(peer_id, "no room"), timeout or 0.0)

    def _withdraw(self, future: asyncio.Future[DeliveryHandle], message_id: bytes, why: str) -> None:
        if future.done() and not future.cancelled():  # room was given, the send will not use it
            self.handles.resolve(message_id, False, 0, f"withdrawn before the hand-off: {why}")
        future.cancel()

    def _pump(self) -> None:
        """Admit the waiters at the head of each peer's queue while the window has room."""
        if not self.queues:
            return
        self._arm()  # before trying: room freed from here on wakes the loop again
        for peer_id in list(self.queues):
            queue = self.queues[peer_id]
            while queue:
                future, message_id, size = queue[0]
                if future.done():  # its sender gave up
                    queue.popleft()
                    continue
                handle = self.handles.try_new(message_id, peer_id, size)
                if not isinstance(handle, DeliveryHandle):
                    self.full[peer_id] = handle
                    break
                queue.popleft()
                future.set_result(handle)
            if not queue:
                del self.queues[peer_id]
                self.full.pop(peer_id, None)

    def _arm(self) -> None:
        if not self.armed:
            self.armed = True
            self.handles.on_room(self._room_freed)

    def _room_freed(self) -> None:  # on the thread that ended a handle
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            self.loop.call_soon_threadsafe(self._woken)

    def _woken(self) -> None:
        self.armed = False
        self._pump()


_ROOMS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.WeakKeyDictionary[Node, _Room]] = (
    weakref.WeakKeyDictionary()
)


_T = TypeVar("_T")


def _of_node(
    table: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.WeakKeyDictionary[Node, _T]],
    loop: asyncio.AbstractEventLoop,
    node: Node,
    make: Callable[[asyncio.AbstractEventLoop, Node], _T],
) -> _T:
    """The ``make(loop, node)`` of ``table`` for this loop and node, made on first use."""
    per_node = table.setdefault(loop, weakref.WeakKeyDictionary())
    found = per_node.get(node)
    if found is None:
        found = per_node[node] = make(loop, node)
    return found


def _room(loop: asyncio.AbstractEventLoop, node: Node) -> _Room:
    return _of_node(_ROOMS, loop, node, _Room)


class _Batch:
    """Sends of one loop turn (or of several, while earlier batches await their answers), handed to
    the retrier in one ``DeliverMany`` and stored in one commit."""

    __slots__ = ("deadline", "pushed", "sends", "timer")

    def __init__(self) -> None:
        self.sends: list[tuple[asyncio.Future[str | None], bytes]] = []
        """Each send's future (resolved with its refusal, None: stored) and envelope, in order."""
        self.pushed = False
        """In the retrier's mailbox: from then on the batch is stored, whether its senders wait or not."""
        self.deadline: float | None = None
        """Loop time, ``send_timeout`` after its first try to hand it over, after which a batch not
        yet handed over, or handed over and not answered, fails (for the latter its outcome is unknown)."""
        self.timer: asyncio.TimerHandle | None = None


class _Outlet:
    """The asyncio sends of one loop to one node's retrier: the group commit of the asyncio face.

    Every send of a loop turn joins one batch (up to :data:`~villagemesh.node.SEND_MANY_CHUNK`),
    handed over at the turn's end as one ``DeliverMany`` told with a bridge token: one push,
    one wake-up of the retrier, one commit. The retrier answers the token once the batch is
    stored, and each send returns then. Batches are handed over in order, at most
    :data:`BATCHES_OUT` awaiting their answers; later sends join the batch waiting behind them.
    One whose answer does not come (the retrier crashed with it: a restart event says so, or
    :data:`~villagemesh.node.ASK_TIMEOUT` passed) is handed over again with the same
    envelopes, which stores nothing twice, until its deadline (``NodeConfig.send_timeout``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, node: Node) -> None:
        self.loop = loop
        self.node = node
        self.waiting: collections.deque[_Batch] = collections.deque()
        """Batches not yet in the mailbox, in order; the last one takes this turn's sends."""
        self.out: dict[int, _Batch] = {}
        """Batches in the mailbox by their bridge token, their commit awaited."""
        self.scheduled = False
        self.delay = PUSH_RETRY
        with node._outlets_lock:
            node._outlets.add(self)

    def put(self, envelope: bytes) -> tuple[_Batch, asyncio.Future[str | None]]:
        """Add a send to this turn's batch: the future its refusal (None: stored) resolves."""
        future: asyncio.Future[str | None] = self.loop.create_future()
        batch = self.waiting[-1] if self.waiting else None
        if batch is None or batch.pushed or len(batch.sends) >= SEND_MANY_CHUNK:
            batch = _Batch()
            self.waiting.append(batch)
        batch.sends.append((future, envelope))
        self._schedule(0.0)
        return batch, future

    def _schedule(self, delay: float) -> None:
        if not self.scheduled:
            self.scheduled = True
            if delay:
                self.loop.call_later(delay, self._push)
            else:
                self.loop.call_soon(self._push)  # after this turn's other sends

    def _push(self) -> None:
        """Hand the waiting batches over, in order, until the mailbox is full (then later)."""
        self.scheduled = False
        while self.waiting and len(self.out) < BATCHES_OUT:
            batch = self.waiting[0]
            if not batch.pushed:
                batch.sends = [(f, e) for f, e in batch.sends if not f.done()]  # cancelled: withdrawn
                if not batch.sends:
                    self.waiting.popleft()
                    continue
            if batch.deadline is None:
                batch.deadline = self.loop.time() + self.node.config.send_timeout
            token, answered = self.node.bridge.register()
            request = DeliverMany(tuple(e for _, e in batch.sends), answer_token=token)
            try:
                self.node._client().tell("retrier", request, timeout=0)
            except (MailboxFull, NoSuchActor) as exc:  # full, or restarting: again shortly
                self.node.bridge.forget(token)
                if self.loop.time() >= batch.deadline:
                    self.waiting.popleft()
                    self._fail(batch, exc)
                    continue
                self._schedule(self.delay)
                self.delay = min(self.delay * 2, 0.05)
                return
            except VillageMeshError as exc:  # the bus refused, or the node stopped or failed: these fail with it
                self.node.bridge.forget(token)
                self.waiting.popleft()
                self._fail(batch, exc)
                continue
            self.delay = PUSH_RETRY
            self.waiting.popleft()
            batch.pushed = True
            self.out[token] = batch
            batch.timer = self.loop.call_later(ASK_TIMEOUT, self._unanswered, token)
            answered.add_done_callback(functools.partial(self._answered, token))

    def _answered(self, token: int, answered: asyncio.Future[Any]) -> None:
        batch = self.out.pop(token, None)
        if batch is None:
            return  # handed over again meanwhile: the newer token answers
        if batch.timer is not None:
            batch.timer.cancel()
        error = answered.exception()
        if error is not None:
            self._fail(batch, error)
            self._schedule(0.0)
            return
        errors = answered.result().errors
        for (future, _), refusal in zip(batch.sends, errors, strict=True):
            if not future.done():
                future.set_result(refusal)
        self._schedule(0.0)  # room for the next batch

    def _unanswered(self, token: int) -> None:
        batch = self.out.pop(token, None)
        if batch is not None:
            self.node.bridge.forget(token)
            sends = len(batch.sends)
            self._again(batch, AskTimeout(f"the retrier did not store {sends} send(s) within {ASK_TIMEOUT} s"))

    def _again(self, batch: _Batch, why: BusError) -> None:
        assert batch.deadline is not None  # (set when it was first handed over)
        if self.loop.time() >= batch.deadline or self.node._failure is not None:
            self._fail(batch, why)
            self._schedule(0.0)
            return
        self.waiting.appendleft(batch)
        self._schedule(0.0)

    def retrier_restarted(self) -> None:
        """The retrier restarted (called in a supervisor's thread): the batches its old instance
        had not answered are handed over again (the mailbox kept those it had not taken; the
        others it may have stored: handing them over again stores nothing twice)."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            self.loop.call_soon_threadsafe(self._restarted)

    def _restarted(self) -> None:
        for token in reversed(list(self.out)):  # (each goes to the front: the oldest ends up first)
            batch = self.out.pop(token)
            self.node.bridge.forget(token)
            if batch.timer is not None:
                batch.timer.cancel()
            self._again(batch, ActorCrashed("retrier", "restart", "it restarted before storing these sends"))

    @staticmethod
    def _fail(batch: _Batch, error: BaseException) -> None:
        for future, _ in batch.sends:
            if not future.done():
                future.set_exception(error)


_OUTLETS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.WeakKeyDictionary[Node, _Outlet]] = (
    weakref.WeakKeyDictionary()
)


def _outlet(loop: asyncio.AbstractEventLoop, node: Node) -> _Outlet:
    return _of_node(_OUTLETS, loop, node, _Outlet)


def _pacer(loop: asyncio.AbstractEventLoop) -> _Pacer:
    pacer = _PACERS.get(loop)
    if pacer is None:
        pacer = _PACERS[loop] = _Pacer(loop)
    return pacer


async def _push(client: Any, to: str, msg: object) -> None:
    """Tell ``to`` without blocking the loop: a full mailbox is retried after a short await."""
    delay = PUSH_RETRY
    while True:
        try:
            client.tell(to, msg, timeout=0)
            return
        except MailboxFull:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)


async def _status_of(handle: DeliveryHandle) -> Any:
    return await handle
