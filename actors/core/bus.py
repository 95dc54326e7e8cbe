"""The in-node message bus: typed messages between named actors over ZeroMQ inproc.

Addressing
    Every actor has a name; its mailbox is a PULL socket bound at
    ``inproc://<node>/<name>``. Senders keep one PUSH socket per destination, made
    and used in the sending thread only (ZeroMQ sockets are not thread-safe).
    One :class:`zmq.Context` per node: inproc only connects sockets of the same
    context, so two nodes in one process cannot reach each other by accident.

Frames
    One ZeroMQ frame per message: the msgpack array
    ``[kind, correlation, reply_to, tag, field...]`` (see :mod:`.codec`). ``kind``
    is TELL, ASK, REPLY or FAULT; an ASK carries the address its REPLY (or FAULT,
    when the handler crashed) must go to. No pickle anywhere.

Mailboxes outlive actor instances
    The mailbox socket belongs to the bus, not to an actor instance: a supervisor
    opens it once, and each new instance of the actor reads from the same socket.
    Messages sent while an actor is crashed or restarting therefore wait in the
    socket's queue and are read by the next instance, in order. The hand-over
    from a dead instance's thread to the next one is safe because the new thread
    starts only after the old one has finished (``Thread.join`` / ``Event.wait``
    are full memory barriers, which is what libzmq asks for to migrate a socket).
    Every other socket an actor uses is its own: made in ``on_start`` (its
    thread), closed when the instance ends.

Bounds
    A mailbox holds at most about ``capacity`` messages per sender (ZeroMQ's high
    water marks on both ends of the pipe). A sender that finds it full waits up
    to ``send_timeout`` seconds for room and then gets :class:`MailboxFull`; a
    full mailbox never blocks a sender forever, and never drops silently.
"""

from __future__ import annotations

import collections
import enum
import itertools
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import zmq

from villagemesh.actors.core import codec
from villagemesh.actors.core.metrics import Metrics
from villagemesh.errors import (
    ActorCrashed,
    AskTimeout,
    BusError,
    CodecError,
    ConfigError,
    MailboxFull,
    NoSuchActor,
)

__all__ = [
    "BATCH_MAX",
    "Bus",
    "Fault",
    "Kind",
    "Mailbox",
    "Sender",
    "decode_frame",
    "encode_batch",
    "encode_frame",
]

DEFAULT_CAPACITY = 10_000
"""Messages a mailbox queues per sender before senders wait: enough to ride out a
restart (about a millisecond) at full bus speed, small enough to bound memory."""

DEFAULT_SEND_TIMEOUT = 1.0
"""Seconds a sender waits for room in a full mailbox before MailboxFull."""

LINGER_MS = 5_000
"""How long a closed sender socket keeps trying to hand queued messages over, so
that an actor that sends and then stops does not lose what it sent."""

BATCH_MAX = 256
"""Tells held for one destination before they go without waiting for the turn's end."""

ZERO_COPY_BYTES = 64 * 1024
"""Frames this large are handed to ZeroMQ without a copy (the frame is an immutable ``bytes``, kept
alive until sent): copying a 2 MiB frame into a fresh ZeroMQ message cost 2.3 ms, mostly page faults,
against 64 µs without (a transfer's chunks are 256 KiB each); pyzmq's own threshold is the same 64 KiB."""

_NOBLOCK = zmq.NOBLOCK
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
"""pyzmq's compiled send: the Python-level wrapper costs as much again per message."""


def _send_uncopied(sock: zmq.Socket[bytes], frame: bytes, flags: int) -> None:
    """Send ``frame`` without copying it (see :data:`ZERO_COPY_BYTES`)."""
    _send(sock, frame, flags, copy=False)

REPLY_SOCKET_CACHE = 1_024
"""Reply addresses a sender keeps sockets open for (least recently used are closed)."""


class Kind(enum.IntEnum):
    """What a frame is."""

    TELL = 0
    ASK = 1
    REPLY = 2
    FAULT = 3
    BATCH = 4


@codec.message("bus.Fault")
@dataclass(frozen=True, slots=True)
class Fault:
    """The reply to an ask whose handler crashed: the actor is being restarted."""

    actor: str
    exc_type: str
    detail: str


def encode_frame(kind: Kind, correlation: int, reply_to: str | None, msg: object) -> bytes:
    """The one frame that carries ``msg``."""
    return codec.pack(codec.to_values(msg, kind.value, correlation, reply_to))


def encode_batch(messages: list[list[Any]]) -> bytes:
    """One frame carrying several messages (their ``[tag, field...]`` arrays) for one mailbox, in order."""
    return codec.pack((Kind.BATCH, len(messages), None, *messages))


def tell_frame(values: Any) -> bytes:
    """The TELL frame of one message given as its ``[tag, field...]`` array (splitting a batch)."""
    return codec.pack((Kind.TELL, 0, None, *values))


def decode_frame(frame: bytes, *, trusted: bool = False) -> tuple[Kind, int, str | None, Any]:
    """Inverse of :func:`encode_frame` (and of :func:`encode_batch`: the "message" is
    then the tuple of the ``[tag, field...]`` arrays it carries, each checked unless
    ``trusted``, none built yet)."""
    values = codec.unpack(frame)
    if type(values) is not tuple or len(values) < 4:
        raise CodecError(f"a bus frame is an array of at least 4 items, got {values!r:.80}")
    kind, correlation, reply_to = values[0], values[1], values[2]
    kind = _KINDS.get(kind) if type(kind) is int else None
    if kind is None or type(correlation) is not int or not (reply_to is None or type(reply_to) is str):
        raise CodecError(f"bad bus frame header {values[:3]!r}")
    if kind is Kind.BATCH:
        inner = values[3:]
        if correlation != len(inner):
            raise CodecError(f"bad batch frame: {correlation} messages announced, {len(inner)} carried")
        if not trusted:
            for one in inner:
                codec.from_values(one)
        return Kind.BATCH, correlation, None, inner
    return kind, correlation, reply_to, codec.from_values(values[3:], trusted=trusted)


_KINDS = {k.value: k for k in Kind}
_TELL, _ASK, _REPLY, _FAULT, _BATCH = (k.value for k in (Kind.TELL, Kind.ASK, Kind.REPLY, Kind.FAULT, Kind.BATCH))
"""Plain ints for headers (msgpack packs an IntEnum member on a slower path)."""


class Mailbox:
    """An actor's inbound queue: a bound PULL socket that outlives actor instances."""

    def __init__(self, bus: Bus, name: str) -> None:
        self.name = name
        self.address = bus.address(name)
        self.socket: zmq.Socket[bytes] = bus.context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, bus.capacity)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.address)
        self.redeliver: collections.deque[bytes] = collections.deque()
        """Frames a dead instance accepted but did not finish (a process child's
        unacknowledged ones): the next instance reads these first."""

    def close(self) -> None:
        """Close the socket; whatever is still queued is dropped (the node is going away)."""
        self.socket.close(linger=0)


class Bus:
    """One node's bus: its zmq Context, its mailboxes and its address scheme."""

    def __init__(
        self,
        node: str,
        *,
        context: zmq.Context[Any] | None = None,
        capacity: int = DEFAULT_CAPACITY,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
        uplink: str | None = None,
        metrics: bool = True,
    ) -> None:
        if not node or "/" in node:
            raise ConfigError(f"node name must be non-empty and contain no '/', got {node!r}")
        if capacity < 1:
            raise ConfigError(f"mailbox capacity must be at least 1, got {capacity!r}")
        if send_timeout <= 0:
            raise ConfigError(f"send_timeout must be positive, got {send_timeout!r}")
        self.node = node
        self.context: zmq.Context[Any] = context if context is not None else zmq.Context()
        self.capacity = capacity
        self.send_timeout = send_timeout
        self.uplink = uplink
        self.metrics = Metrics(enabled=metrics)
        """Messages in and out, mailbox depths, ask latencies (see :mod:`.metrics`)."""
        self.control: Any = None
        """In a process child: the Unix socket on which the actor marks each frame it begins."""
        """In a process child: the local address (``_uplink``) through which frames for
        names this bus does not have, replies and acknowledgements go to the node."""
        self._mailboxes: dict[str, Mailbox] = {}
        self._lock = threading.Lock()
        self._clients = threading.local()
        self._all_clients: list[Sender] = []
        self._closed = False

    def address(self, name: str) -> str:
        """The inproc address of ``name`` on this node."""
        return f"inproc://{self.node}/{name}"

    def open_mailbox(self, name: str) -> Mailbox:
        """Bind the mailbox of ``name`` (once; later calls return the same mailbox)."""
        if not name or name.startswith("_"):
            raise ConfigError(f"actor names are non-empty and do not start with '_', got {name!r}")
        with self._lock:
            if self._closed:
                raise BusError(f"bus of node {self.node!r} is closed")
            box = self._mailboxes.get(name)
            if box is None:
                box = self._mailboxes[name] = Mailbox(self, name)
            return box

    def mailbox(self, name: str) -> Mailbox:
        """The open mailbox of ``name``; NoSuchActor if there is none."""
        try:
            return self._mailboxes[name]
        except KeyError:
            raise NoSuchActor(f"no actor named {name!r} on node {self.node!r}") from None

    def has(self, name: str) -> bool:
        """Whether ``name`` has a mailbox on this bus."""
        return name in self._mailboxes

    def names(self) -> list[str]:
        """Every actor name with a mailbox, in opening order."""
        return list(self._mailboxes)

    def close_mailbox(self, name: str) -> None:
        """Close and forget the mailbox of ``name`` (its queued messages are dropped)."""
        with self._lock:
            box = self._mailboxes.pop(name, None)
        if box is not None:
            box.close()

    def client(self) -> Sender:
        """The calling thread's own sender, for code that is not an actor.

        Made on first use in each thread and closed by :meth:`close`. Use it only
        from the thread that got it.
        """
        sender: Sender | None = getattr(self._clients, "sender", None)
        if sender is None or sender.closed:
            sender = Sender(self, owner=f"client-{threading.get_ident()}")
            self._clients.sender = sender
            with self._lock:
                self._all_clients.append(sender)
        return sender

    def close(self) -> None:
        """Close every mailbox and client socket, then the context.

        Call after every actor of the node has stopped (their own sockets are closed
        by then); client threads must not use their senders afterwards.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            boxes, self._mailboxes = list(self._mailboxes.values()), {}
            clients, self._all_clients = self._all_clients, []
        for box in boxes:
            box.close()
        for client in clients:
            client.close(linger=0)
        self.context.destroy(linger=0)


class Sender:
    """Sends frames from one thread: one PUSH socket per destination, made lazily.

    Confined to the thread that first uses it (an actor's thread, or a client
    thread via :meth:`Bus.client`). Asks wait on a private reply socket, so an
    actor can ask another actor without reading its own mailbox meanwhile.
    """

    def __init__(self, bus: Bus, *, owner: str, coalesce: bool = False) -> None:
        self._bus = bus
        self.owner = owner
        self.coalesce = coalesce
        """Hold tells to each destination until :meth:`flush` (an actor flushes at the end
        of every handler turn), sending each destination one BATCH frame."""
        self._pending: dict[str, list[tuple[Any, ...]]] = {}
        self._sockets: dict[str, zmq.Socket[bytes]] = {}
        self._reply_sockets: OrderedDict[str, zmq.Socket[bytes]] = OrderedDict()
        self._reply_name: str | None = None
        self._reply_socket: zmq.Socket[bytes] | None = None
        self._uplink_socket: zmq.Socket[bytes] | None = None
        self._reply_timeout = -1
        self._correlation = itertools.count(1)
        self._pack = codec.packer()
        self._metrics = bus.metrics
        self._metered = bus.metrics.enabled
        self.sent: dict[str, int] = {}
        """Messages sent to each mailbox, when the bus counts (see :mod:`.metrics`)."""
        if self._metered:
            bus.metrics.add_sender(self)
        self.closed = False
        self.late_replies = 0
        """Replies that arrived after their ask had timed out (dropped, counted here)."""

    # -- sending ---------------------------------------------------------------------

    def tell(self, to: str, msg: object, *, timeout: float | None = None) -> None:
        """Send ``msg`` to the actor named ``to``; MailboxFull if it stays full.

        When coalescing (inside an actor), the frame waits for the end of the
        handler turn or for :data:`BATCH_MAX` frames, unless ``timeout`` is given.
        """
        if not self.coalesce or timeout is not None:
            self.send_frame(to, self._encode(_TELL, 0, None, msg), timeout=timeout)
            return
        pending = self._pending.get(to)
        if pending is None:
            if not self._bus.has(to) and self._bus.uplink is None:
                raise NoSuchActor(f"no actor named {to!r} on node {self._bus.node!r}")
            pending = self._pending[to] = []
        pending.append(codec.to_values(msg))
        if len(pending) >= BATCH_MAX:
            self._flush_to(to)

    def tell_many(self, to: str, msgs: list[Any], *, timeout: float | None = None) -> None:
        """Send ``msgs`` to ``to`` now, in one frame (a BATCH when more than one), after any held for it.

        MailboxFull after ``timeout`` (default: the bus's send timeout): all of them or none.
        """
        if not msgs:
            return
        if len(msgs) == 1:
            frame = self._encode(_TELL, 0, None, msgs[0])
        else:
            frame = self._encode_values((_BATCH, len(msgs), None, *(codec.to_values(m) for m in msgs)))
        self.send_frame(to, frame, timeout=timeout)

    def flush(self) -> None:
        """Send every held tell now (one frame per destination)."""
        while self._pending:
            self._flush_to(next(iter(self._pending)))

    def _flush_to(self, to: str) -> None:
        held = self._pending.pop(to, None)
        if held:
            if self._metered:
                self.sent[to] = self.sent.get(to, 0) + len(held)
            values = (_TELL, 0, None, *held[0]) if len(held) == 1 else (_BATCH, len(held), None, *held)
            self._send_now(to, self._encode_values(values), None)

    def send_frame(self, to: str, frame: bytes, *, timeout: float | None = None) -> None:
        """Send one ready-made frame to the mailbox of ``to`` (after any held for it)."""
        if to in self._pending:
            self._flush_to(to)
        self._send_now(to, frame, timeout)
        if self._metered:
            self.sent[to] = self.sent.get(to, 0) + 1

    def _send_now(self, to: str, frame: bytes, timeout: float | None) -> None:
        sock = self._sockets.get(to)
        if sock is None:
            if not self._bus.has(to):
                if self._bus.uplink is not None:
                    self.uplink(b"out", to.encode(), frame)
                    return
                raise NoSuchActor(f"no actor named {to!r} on node {self._bus.node!r}")
            sock = self._sockets[to] = self._connect(self._bus.address(to))
        self._push(sock, frame, to, timeout)

    def reply(self, reply_to: str, correlation: int, msg: object, *, fault: bool = False) -> None:
        """Answer an ask: ``reply_to`` is the private address the asker gave.

        Everything held is sent first, so whoever the asker tells next cannot
        overtake what the handler sent before answering.
        """
        if self._pending:
            self.flush()
        frame = self._encode(_FAULT if fault else _REPLY, correlation, None, msg)
        if self._bus.uplink is not None:
            self.uplink(b"reply", reply_to.encode(), frame)
            return
        self.reply_frame(reply_to, frame)

    def reply_frame(self, reply_to: str, frame: bytes) -> None:
        """Send a ready-made REPLY or FAULT frame to an asker's private address."""
        sock = self._reply_sockets.get(reply_to)
        if sock is None:
            sock = self._reply_sockets[reply_to] = self._connect(self._bus.address(reply_to))
            if len(self._reply_sockets) > REPLY_SOCKET_CACHE:
                _, oldest = self._reply_sockets.popitem(last=False)
                oldest.close()
        else:
            self._reply_sockets.move_to_end(reply_to)
        self._push(sock, frame, reply_to, self._bus.send_timeout)

    def uplink(self, *parts: bytes) -> None:
        """Send a multipart frame to the node this process child belongs to (after every held tell)."""
        if parts[0] != b"out":
            self.flush()
        if self._bus.uplink is None:
            raise BusError(f"bus of node {self._bus.node!r} has no uplink")
        sock = self._uplink_socket
        if sock is None:
            sock = self._uplink_socket = self._connect(self._bus.address(self._bus.uplink))
        sock.send_multipart(parts)

    def ask(self, to: str, msg: object, *, timeout: float) -> Any:
        """Send ``msg`` as a request and wait up to ``timeout`` seconds for the reply.

        Raises AskTimeout when no reply comes in time, and ActorCrashed when the
        actor crashed handling the request (it is being restarted). The timeout is
        mandatory: an ask never waits forever.
        """
        if not timeout > 0:
            raise ConfigError(f"ask timeout must be a positive number of seconds, got {timeout!r}")
        asked = _perf_counter() if self._metered else 0.0
        reply_sock = self._reply_socket or self._ensure_reply_socket()
        correlation = next(self._correlation)
        frame = self._encode(_ASK, correlation, self._reply_name, msg)
        sock = self._sockets.get(to)
        if sock is None or to in self._pending:
            self.send_frame(to, frame, timeout=timeout)
        else:
            self._push(sock, frame, to, timeout)
            if self._metered:
                self.sent[to] = self.sent.get(to, 0) + 1
        left = int(timeout * 1000)
        deadline = 0  # read from the clock only if a late reply costs us time
        while True:
            # A blocking recv bounded by RCVTIMEO: one call, no separate poll.
            if left != self._reply_timeout:
                reply_sock.setsockopt(zmq.RCVTIMEO, left)
                self._reply_timeout = left
            try:
                frame = _recv(reply_sock, 0)
            except zmq.Again:
                raise AskTimeout(f"no reply from {to!r} to {type(msg).__name__} within {timeout} s") from None
            kind, corr, _, answer = decode_frame(frame, trusted=True)
            if corr != correlation:
                self.late_replies += 1
                if not deadline:
                    deadline = _monotonic_ms() + left
                left = deadline - _monotonic_ms()
                if left <= 0:
                    raise AskTimeout(f"no reply from {to!r} to {type(msg).__name__} within {timeout} s")
                continue
            if kind == _FAULT:
                raise ActorCrashed(answer.actor, answer.exc_type, answer.detail)
            if asked:
                self._metrics.actor(to).latency.append(_perf_counter() - asked)
            return answer

    # -- plumbing ----------------------------------------------------------------------

    def _encode(self, kind: int, correlation: int, reply_to: str | None, msg: object) -> bytes:
        return self._encode_values(codec.to_values(msg, kind, correlation, reply_to))

    def _encode_values(self, values: tuple[Any, ...]) -> bytes:
        try:
            return self._pack(values)
        except codec.PACK_ERRORS as exc:
            raise codec.pack_error(values, exc) from exc

    def _connect(self, address: str) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self._bus.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self._bus.capacity)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.connect(address)
        return sock

    def _push(self, sock: zmq.Socket[bytes], frame: bytes, to: str, timeout: float | None) -> None:
        send = _send if len(frame) < ZERO_COPY_BYTES else _send_uncopied
        try:
            send(sock, frame, _NOBLOCK)
            return
        except zmq.Again:
            pass
        wait = self._bus.send_timeout if timeout is None else timeout
        if sock.poll(int(wait * 1000), zmq.POLLOUT):
            send(sock, frame, _NOBLOCK)
            return
        raise MailboxFull(f"mailbox of {to!r} stayed full for {wait} s (capacity {self._bus.capacity})")

    def _ensure_reply_socket(self) -> zmq.Socket[bytes]:
        if self._reply_socket is None:
            self._reply_name = f"_reply/{self.owner}/{uuid.uuid4().hex[:12]}"
            sock: zmq.Socket[bytes] = self._bus.context.socket(zmq.PULL)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(self._bus.address(self._reply_name))
            self._reply_socket = sock
        return self._reply_socket

    def close(self, *, linger: int | None = None) -> None:
        """Close every socket this sender made (queued frames get ``LINGER_MS`` to leave)."""
        if self.closed:
            return
        self.closed = True
        self._pending.clear()
        if self._metered:
            self._metrics.retire_sender(self)
        for sock in [*self._sockets.values(), *self._reply_sockets.values()]:
            sock.close(linger=linger)
        if self._reply_socket is not None:
            self._reply_socket.close(linger=0)
        if self._uplink_socket is not None:
            self._uplink_socket.close(linger=linger)
        self._sockets.clear()
        self._reply_sockets.clear()


_perf_counter = time.perf_counter


def _monotonic_ms() -> int:
    return int(time.monotonic() * 1000)
