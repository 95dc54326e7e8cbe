"""Process isolation: the same actor class in a child process, reached over ``ipc://``.

A native crash (a segfault in a BLE stack, an ``os._exit`` in a library) must
not take the node down, so a child spec with ``isolation="process"`` runs its
actor in a process of its own::

    node process                                     child process (forked by the fork server)
    ┌──────────────────────────────────────┐         ┌──────────────────────────────────────┐
    │ mailbox inproc://node/name  (PULL)   │         │ relay (main thread)                   │
    │   │                                  │  ipc:// │   DEALER ◄──────────────► feeds the   │
    │ ProcessHost actor ── ROUTER ─────────┼─────────┼─► local mailbox ──► the actor (thread) │
    │   relays "out"/"reply"/"log" frames  │ ◄───────┼── _uplink (PULL) ◄── tells, replies,   │
    │   watches the child's pidfd          │         │                      acks, log events │
    └──────────────────────────────────────┘         └──────────────────────────────────────┘

The frames are the bus's own (the same codec, no pickle). The host is an
ordinary thread actor that owns the child's mailbox; the supervisor sees it
as the child, so restart policy, intensity and the log work unchanged.

Children are forked by a single-threaded fork server (see :mod:`.forkserver`),
never by the node (a multi-threaded process with a zmq Context cannot fork
safely), so a restart costs a ``fork()`` of a warm interpreter, not a fresh one.
In fact not even that: the server keeps :data:`SPARES` children forked and
prepared (a zmq Context, the timer thread) and, when they are idle, rehearsed
(:func:`_rehearse`: one dry run of a child's start and first request, so that
the copy-on-write page faults of that path are paid before the restart, not
during it). A restart hands its config to a spare; the new child says hello
as soon as it has connected, so the host forwards while the child sets up;
and the host asks for the next spare only after its child's first
acknowledgement (or :data:`REFILL_AFTER` seconds), so that a fork and a
spare's set-up do not take the CPU that child's start needs.

Death is noticed at once: the host polls a pidfd of its child in the same
``poll`` as its sockets; no timer is involved.

What is not lost: the host keeps every frame it forwarded until the child
acknowledges it (a window of :data:`WINDOW` frames; beyond that the host stops
reading the mailbox, so the mailbox bound applies). The child says ``begin``
before it handles a frame and ``ack`` after. When the child dies, a frame it
had begun and not acknowledged is taken to be the one that killed it: it is
dropped (an asker gets a FAULT at once, ``ActorCrashed``); every other
unacknowledged frame goes back to the mailbox, ahead of newer frames, for the
next instance. (If a child dies in the instant between beginning a frame and
its ``begin`` reaching the host, that frame is handed back too: at-least-once
for the frame in progress in that window.) A child that stops on request hands
back what it did not handle the same way.

A child whose actor stops itself (its process reports a normal exit and exits 0)
ends its host normally too, exactly as a thread child's own stop does: no crash
is reported, and a transient child is not restarted. Any other end (a signal, a
non-zero status, no exit report) is a crash (:class:`ChildProcessDied`).
A connection hand-off (``ConnectionHandedOff``, a socket the acceptor sniffed)
reaches a process child too: the host sends the descriptor over the control
socket (``SCM_RIGHTS``) and closes its own copy, then the frame, marked ``fd``;
the child's relay takes the descriptor and gives the actor the frame with its
own number for it. The frame the host keeps for a hand-back says ``fd=-1``: a
hand-off whose child died before adopting it is dropped and logged
(``connection_handoff_lost``), never sent again with a number that may by then
name another file.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import os
import select
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from villagemesh.actors.core import codec
from villagemesh.actors.core.base import Actor, ActorContext, ExitKind, ExitReport, Ok, Scheduler, format_traceback
from villagemesh.actors.core.bus import Bus, Fault, Kind, decode_frame, encode_frame, tell_frame
from villagemesh.actors.core.handoff import claim
from villagemesh.actors.core.transport import ConnectionHandedOff
from villagemesh.errors import CodecError, ConfigError, SupervisionError

__all__ = ["ChildProcessDied", "ProcessHost", "ProcessLauncher", "child_main"]

WINDOW = 64
"""Frames in flight to a child before the host waits for acknowledgements: deep
enough to keep a child busy, small enough that a crash hands back little."""

HELLO_TIMEOUT = 10.0
"""Seconds a new child has to connect and say hello before the host gives up."""

REAP_TIMEOUT = 1.0
"""Seconds a host waits for the fork server to report its ended child (it takes microseconds)."""

REFILL_AFTER = 0.05
"""Seconds after its child's hello when a host asks for the next warm spare, if the child
has not acknowledged a frame before (its first acknowledgement asks at once)."""

FINISH_TIMEOUT = 2.0
"""Seconds a child waits for its ended actor's thread to finish reporting (it takes microseconds)."""

SPARES = 2
"""Warm spares the fork server keeps ready (about 3 MB of private memory each, once rehearsed).
Two, because a host asks for the next one only once its child has answered (so that the
fork does not slow that child's start): a second restart before then still finds one."""

CHILD_TARGET = "villagemesh.supervision.process:child_main"


_HANDOFF_TAG = codec.tag_of(ConnectionHandedOff)
"""The codec tag of :class:`ConnectionHandedOff` (a batch carries tags, not objects)."""


def _handoff_in(values: Any) -> ConnectionHandedOff | None:
    """The hand-off a batch entry ``[tag, field...]`` is, or None (decoded only when its tag says so)."""
    return codec.from_values(values, trusted=True) if values[0] == _HANDOFF_TAG else None

class ChildProcessDied(SupervisionError):
    """A process-isolated child's process ended (killed, crashed, or exited)."""


class ProcessLauncher:
    """One per node: the fork server and the folder for the children's ipc sockets."""

    def __init__(self, *, preload: tuple[str, ...] = (), spares: int = SPARES) -> None:
        from villagemesh.supervision.forkserver import ForkServer

        self._dir = tempfile.mkdtemp(prefix="villagemesh-ipc-", dir=_socket_parent())
        self.server = ForkServer.start(
            preload=("villagemesh.supervision.process", *preload), warm=(CHILD_TARGET,), spares=spares
        )
        self._lock = threading.Lock()

    def ipc_address(self, node: str, name: str, instance: str) -> str:
        """A fresh ``ipc://`` address for one child instance."""
        return f"ipc://{self._dir}/{node}-{name}-{instance}.sock"

    def control_path(self, node: str, name: str, instance: str) -> str:
        """The Unix socket path on which one child instance marks the frames it begins."""
        return f"{self._dir}/{node}-{name}-{instance}.ctl"

    def fork(self, arg: bytes) -> int:
        """Fork a child running :func:`child_main` with ``arg``; its pid. The next warm spare
        waits for :meth:`refill`."""
        with self._lock:
            return int(self.server.fork(CHILD_TARGET, arg, refill=False))

    def refill(self) -> None:
        """Have the fork server make the next warm spare (a host calls it once its child is up,
        so that the spare's fork and set-up do not compete with that child's start)."""
        try:
            self.server.refill(CHILD_TARGET)
        except SupervisionError:
            return  # the fork server is gone (the node is stopping): the next fork will say so

    def exit_status(self, pid: int, timeout: float) -> int | None:
        """The child's exit status as the fork server saw it (``-N`` for signal N), if known in time."""
        try:
            result = self.server.wait_exit(pid, timeout)
        except SupervisionError:
            return None  # the fork server itself is gone (the node is stopping): status unknown
        if result is None:
            return None
        return int(result.returncode)

    def close(self) -> None:
        """Kill every child and stop the fork server."""
        self.server.close()
        for entry in os.scandir(self._dir):
            os.unlink(entry.path)
        os.rmdir(self._dir)


def _socket_parent() -> str | None:
    """Where the folder of the children's sockets goes: a file system in memory when the
    machine has one (``$XDG_RUNTIME_DIR``, else ``/dev/shm``), since every restart binds two
    sockets there, which on a disk file system costs a journaled inode each (tens to
    hundreds of microseconds); else the default temporary folder."""
    for parent in (os.environ.get("XDG_RUNTIME_DIR"), "/dev/shm"):
        if parent and os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK):
            return parent
    return None


class _FromChild:
    """Inbox item: the ROUTER socket is readable."""


class _ChildExited:
    """Inbox item: the child's pidfd is readable (the process ended)."""


class _Control:
    """Inbox item: the control listener or connection is readable."""


_FROM_CHILD = _FromChild()
_CHILD_EXITED = _ChildExited()
_CONTROL = _Control()


class _HelloTimeout:
    """Timer message: the child did not say hello in time."""


class _RefillDue:
    """Timer message: the child said hello a while ago and has not acknowledged a frame yet."""


class ProcessHost(Actor):
    """Stands in the node for a process-isolated child; the supervisor supervises it."""

    def __init__(self, ctx: ActorContext, *, spec: Any, launcher: ProcessLauncher) -> None:
        super().__init__(ctx)
        self.spec = spec
        self.launcher = launcher
        self.address = launcher.ipc_address(ctx.bus.node, ctx.name, self.instance)
        self._control_path = launcher.control_path(ctx.bus.node, ctx.name, self.instance)
        # Listening before the fork, so the child's connect cannot fail; the socket is
        # only accepted on and read in the actor's own thread.
        self._control_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._control_listener.bind(self._control_path)
        self._control_listener.listen(1)
        self._control: socket.socket | None = None
        # Bound before the fork too, so the child's first connect succeeds (a refused ipc
        # connect waits out zmq's reconnect interval). Like a mailbox, this socket is made
        # here and used only by the actor's thread from on_start on: the thread start is
        # the memory barrier libzmq asks for when a socket changes threads.
        self._router = ctx.bus.context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(self.address)
        arg = codec.pack(
            {
                "target": spec.target,
                "node": ctx.bus.node,
                "name": ctx.name,
                "address": self.address,
                "control": self._control_path,
                "config": dict(ctx.config),
            }
        )
        try:
            self.pid = launcher.fork(arg)
        except BaseException:
            self._router.close(linger=0)
            self._control_listener.close()
            os.unlink(self._control_path)
            self._inbox.close()  # this instance never runs: nothing else would close it
            raise
        self._unacked: collections.deque[bytes] = collections.deque()
        self._begun = 0
        """Frames the child marked as begun (its control socket), since it started."""
        self._acked = 0
        """Frames the child acknowledged (after their outputs, on the ipc socket)."""
        self._identity: bytes | None = None
        self._child_report: ExitReport | None = None
        self._pidfd: int | None = None
        self._stopping_child = False
        self._child_gone = False
        """The child process ended normally and was reaped (its actor stopped itself)."""
        self._refill_timer: Any = None

    def on_start(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            raise ChildProcessDied(f"child {self.name!r} (pid {self.pid}) died before it could be watched") from None
        self._inbox.paused = True  # nothing goes to the child before its hello
        self._inbox.watch(self._router, lambda: _FROM_CHILD)
        self._inbox.watch(self._pidfd, lambda: _CHILD_EXITED)
        self._inbox.watch(self._control_listener, lambda: _CONTROL)
        self._hello_timer = self.schedule(HELLO_TIMEOUT, _HelloTimeout())

    def _dispatch(self, message: Any) -> Any:
        if message is _FROM_CHILD:
            return self._read_child()
        if message is _CHILD_EXITED:
            return self._child_exited()
        if message is _CONTROL:
            return self._read_control()
        return super()._dispatch(message)

    def _on_frame(self, frame: bytes) -> None:
        self._forward(frame)  # the host does not decode its child's messages: it relays them

    def _before_stop(self) -> None:
        """No drain: frames still in the mailbox wait there for the next child."""

    def handle(self, msg: Any) -> Any:
        if isinstance(msg, _HelloTimeout):
            raise ChildProcessDied(f"child {self.name!r} (pid {self.pid}) did not say hello within {HELLO_TIMEOUT} s")
        if isinstance(msg, _RefillDue):
            return self._refill()
        return super().handle(msg)

    # -- towards the child -----------------------------------------------------------------

    def _forward(self, frame: bytes) -> None:
        assert self._identity is not None
        kind, _, _, inner = decode_frame(frame, trusted=True)
        if self._metered:
            self.metrics.received += len(inner) if kind is Kind.BATCH else 1
        # A batch is split so that every message is acknowledged on its own.
        if kind is Kind.BATCH:
            parts = [(tell_frame(v), _handoff_in(v)) for v in inner]
        else:
            parts = [(frame, inner if isinstance(inner, ConnectionHandedOff) else None)]
        for one, handed in parts:
            part = b"msg"
            if handed is not None:
                one = self._pass_descriptor(handed)
                if not one:
                    continue
                part = b"fd"
            self._router.send_multipart([self._identity, part, one])
            self._unacked.append(one)
        if len(self._unacked) >= WINDOW:
            self._inbox.paused = True

    def _pass_descriptor(self, handed: ConnectionHandedOff) -> bytes:
        """Send a hand-off's descriptor to the child (SCM_RIGHTS on the control socket); the frame to follow it.

        The node's copy is closed once sent: the child owns the connection, as a thread
        child would. The frame kept for a hand-back says ``fd=-1``, so a later child is
        never sent whatever the node's descriptor number has come to mean since. A
        hand-off that cannot be passed (handed back after its child died, or a failed
        send) is dropped and logged (``connection_handoff_lost``): the peer reconnects.
        """
        reason = "handed back after its child died" if handed.fd < 0 else None
        if reason is None:
            try:
                socket.send_fds(self._control_socket(), [b"F"], [handed.fd])
            except OSError as exc:
                reason = f"cannot pass the descriptor: {exc}"
            finally:
                release = claim(handed.fd)
                os.close(handed.fd)
                if release is not None:
                    # Counted against the node's caps until it leaves the node's process; from
                    # here the child's own process (its descriptor limit) bounds it.
                    release()
        if reason is not None:
            self.ctx.log.emit("connection_handoff_lost", level="warning", peer=handed.peer, reason=reason)
            return b""
        return encode_frame(Kind.TELL, 0, None, dataclasses.replace(handed, fd=-1))

    def _control_socket(self) -> socket.socket:
        """The child's control connection, accepted now if it has not been yet (the child connects after hello;
        when the listener is readable the accept is immediate, else it waits up to HELLO_TIMEOUT)."""
        if self._control is None:
            self._control_listener.settimeout(HELLO_TIMEOUT)
            self._control, _ = self._control_listener.accept()
            self._control.setblocking(False)
            self._inbox.unwatch(self._control_listener)
            self._inbox.watch(self._control, lambda: _CONTROL)
        return self._control

    # -- from the child ---------------------------------------------------------------------

    def _read_child(self) -> None:
        while True:
            try:
                parts = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_child_frame(parts)

    def _on_child_frame(self, parts: list[bytes]) -> None:
        identity, kind, rest = parts[0], parts[1], parts[2:]
        if kind == b"ack":
            self._acked += 1
            if self._refill_timer is not None:
                self._refill()
            if self._unacked:
                self._unacked.popleft()
            if len(self._unacked) < WINDOW and self._identity is not None and not self._stopping_child:
                self._inbox.paused = False
        elif kind == b"out":
            self._relay(rest[0].decode(), rest[1], reply=False)
        elif kind == b"reply":
            self._relay(rest[0].decode(), rest[1], reply=True)
        elif kind == b"log":
            record = codec.unpack(rest[0])
            event = record.pop("event")
            level = record.pop("level", "info")
            self.ctx.log.emit(event, level=level, child_pid=self.pid, **record)
        elif kind == b"hello":
            if int(rest[0]) != self.pid:
                raise ChildProcessDied(f"child {self.name!r}: hello from pid {rest[0]!r}, expected {self.pid}")
            self._identity = identity
            self._hello_timer.cancel()
            self._inbox.paused = False
            self._refill_timer = self.schedule(REFILL_AFTER, _RefillDue())
        elif kind == b"exit":
            kind_, exc_type, exc_message, tb = codec.unpack(rest[0])
            self._child_report = ExitReport(self.instance, ExitKind(kind_), exc_type, exc_message, tb)
        else:
            self.ctx.log.emit("message_rejected", level="warning", actor=self.name, reason=f"child sent {kind!r}")

    def _refill(self) -> None:
        """The child has answered (or had time to start): the fork server may make the next spare.
        Not sooner: a fork and a spare's set-up take CPU the child's start needs."""
        self._refill_timer.cancel()
        self._refill_timer = None
        self.launcher.refill()

    def _read_control(self) -> None:
        control = self._control_socket()
        while True:
            try:
                data = control.recv(65536)
            except BlockingIOError:
                return
            if not data:  # the child's end is closed: its pidfd tells the rest
                self._inbox.unwatch(control)
                return
            self._begun += data.count(b"B")

    def _relay(self, to: str, frame: bytes, *, reply: bool) -> None:
        # Frames enter the node here: they are checked field by field (the node's own
        # actors decode trusted frames cheaply).
        try:
            decode_frame(frame)
        except CodecError as exc:
            self.ctx.log.emit("message_rejected", level="warning", actor=self.name, reason=f"from child: {exc}")
            return
        try:
            if reply:
                self.sender.reply_frame(to, frame)
            else:
                self.sender.send_frame(to, frame)
        except Exception as exc:  # noqa: BLE001 - the child cannot see a node-side error: it is logged
            self.ctx.log.emit(
                "message_undeliverable", level="warning", actor=self.name, to=to, reason=f"{type(exc).__name__}: {exc}"
            )

    # -- the child's end ----------------------------------------------------------------------

    def _child_exited(self) -> None:
        self._read_child()  # acks and an exit report sent just before the end may still be queued
        if self._control is not None:
            self._read_control()  # begin marks are in the kernel's buffer even after the death
        status = self.launcher.exit_status(self.pid, timeout=REAP_TIMEOUT)
        if self._child_report is None and status in (0, 1):
            self._await_exit_report()
        report = self._child_report
        # The last frame the child began and did not acknowledge is not handed back (it
        # may be what killed it, and would kill the next child too). A child that crashed
        # in Python already sent its asker a FAULT; a killed one could not, so we do.
        # Every other unacknowledged frame goes back to the mailbox, in order.
        in_progress = self._begun - 1 - self._acked
        self._hand_back(poison=in_progress if 0 <= in_progress < len(self._unacked) else None, fault=report is None)
        if report is not None and report.crashed:
            self._report = ExitReport(
                self.instance, ExitKind.CRASH, report.exc_type, report.exc_message, report.traceback
            )
            raise ChildProcessDied(
                f"child {self.name!r} (pid {self.pid}) crashed: {report.exc_type}: {report.exc_message}"
            )
        if report is not None and status == 0:
            # The child's actor stopped itself and its process exited cleanly: a normal exit of
            # this host too, as a thread child's own stop is (a transient child stays down).
            self._child_gone = True
            self._stop()
            return
        raise ChildProcessDied(f"child {self.name!r} (pid {self.pid}) {_describe(status)}")

    def _await_exit_report(self) -> None:
        """The child exited 0 or 1, which it does only after sending its exit report (its DEALER
        lingers until it is out): the report may still be on its way through ``ipc://``; wait for
        it a bounded time, so a normal stop is not taken for a death, nor a Python crash for a kill."""
        deadline = time.monotonic() + REAP_TIMEOUT
        while self._child_report is None:
            left = deadline - time.monotonic()
            if left <= 0 or not self._router.poll(int(left * 1000) + 1):
                return
            self._read_child()

    def _hand_back(self, *, poison: int | None, fault: bool) -> None:
        """Unacknowledged frames go back to the mailbox, ahead of newer ones, except the poison."""
        if poison is not None:
            frame = self._unacked[poison]
            del self._unacked[poison]
            self._drop(frame, fault=fault)
        mailbox = self.ctx.bus.mailbox(self.name)
        mailbox.redeliver.extendleft(reversed(self._unacked))
        self._unacked.clear()

    def _drop(self, frame: bytes, *, fault: bool) -> None:
        try:
            kind, correlation, reply_to, msg = decode_frame(frame)
        except CodecError:
            return  # an undecodable frame has nobody to tell
        self.ctx.log.emit(
            "message_dropped",
            level="warning",
            actor=self.name,
            reason="the child died handling it",
            tag=codec.tag_of(type(msg)),
        )
        if fault and kind is Kind.ASK and reply_to is not None:
            answer = Fault(self.name, "ChildProcessDied", f"child process {self.pid} died handling the request")
            self.sender.reply_frame(reply_to, encode_frame(Kind.FAULT, correlation, None, answer))

    def on_stop(self) -> None:
        self._stopping_child = True
        self._inbox.paused = True
        if self._child_gone:
            return  # it ended by itself and was reaped: nothing to stop, nothing unacknowledged
        if self._pidfd is not None and self._identity is not None:
            self._router.send_multipart([self._identity, b"stop"])
            ready, _, _ = select.select([self._pidfd], [], [], self.spec.shutdown)
            if ready:
                self._read_child()
        self._kill_child()
        # Reaped before the supervisor hears of the stop: the process is gone, not a zombie.
        self.launcher.exit_status(self.pid, timeout=REAP_TIMEOUT)
        if self._unacked:
            self._hand_back(poison=None, fault=False)

    def _teardown(self) -> None:
        try:
            self._kill_child()
            if not self._router.closed:
                self._inbox.unwatch(self._router)
                self._router.close(linger=0)
            if self._pidfd is not None:
                self._inbox.unwatch(self._pidfd)
                os.close(self._pidfd)
                self._pidfd = None
            for sock in (self._control, self._control_listener):
                if sock is not None:
                    self._inbox.unwatch(sock)
                    sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._control_path)
        finally:
            super()._teardown()  # the sender's sockets and the inbox, whatever failed above

    def _kill_child(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return  # already gone


def _describe(status: int | None) -> str:
    if status is None:
        return "ended (exit status unknown)"
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


# -- the child side ---------------------------------------------------------------------------


class _UplinkLog:
    """A child's event log: every event goes to the node's log through the host."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    def emit(self, event: str, *, level: str = "info", **fields: Any) -> None:
        self._bus.client().uplink(b"log", codec.pack({"event": event, "level": level, **fields}))


def _load(target: str) -> type[Actor]:
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type) or not issubclass(obj, Actor):
        raise ConfigError(f"{target} is not an Actor class")
    return obj


@dataclass(frozen=True)
class _Prepared:
    """What a warm spare makes before it knows which actor it will run."""

    zctx: zmq.Context[Any]
    scheduler: Scheduler


def _prepare_child() -> _Prepared:
    zctx: zmq.Context[Any] = zmq.Context()
    probe = zctx.socket(zmq.PAIR)  # starts zmq's I/O thread and touches its code paths now, not at restart
    probe.close(linger=0)
    return _Prepared(zctx, Scheduler())


def child_main(arg: bytes, prepared: _Prepared | None = None) -> None:
    """Entry point of a forked child: run one actor and relay its frames to the host."""
    if prepared is None:
        prepared = _prepare_child()
    report, bus = _serve(codec.unpack(arg), prepared)
    prepared.scheduler.close()
    bus.close()  # and the zmq Context, which waits for the exit report to be out
    _exit(1 if report.crashed else 0)


def _serve(cfg: dict[str, Any], prepared: _Prepared) -> tuple[ExitReport, Bus]:
    """Run the actor ``cfg`` names, relaying its frames, until it ends; its exit report (also sent
    to the host) and its bus, whose mailboxes are still open."""
    name, zctx = cfg["name"], prepared.zctx
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 2_000)
    dealer.setsockopt(zmq.RECONNECT_IVL, 2)  # the host binds at once: retry fast, not after 100 ms
    dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 20)
    dealer.connect(cfg["address"])
    # Hello first: the host starts forwarding while this process sets up (frames wait in the
    # DEALER's queue until the relay loop below reads them), not after.
    dealer.send_multipart([b"hello", str(os.getpid()).encode()])
    bus = Bus(cfg["node"], context=zctx, uplink="_uplink")
    control = bus.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.connect(cfg["control"])
    uplink = zctx.socket(zmq.PULL)
    uplink.bind(bus.address("_uplink"))
    bus.open_mailbox(name)
    feed = zctx.socket(zmq.PUSH)
    feed.connect(bus.address(name))
    wake_r, wake_w = os.pipe()
    report: list[ExitReport] = []

    def watcher(actor: Any, rep: ExitReport) -> None:
        report.append(rep)
        os.write(wake_w, b"x")

    log, config = _UplinkLog(bus), dict(cfg["config"])
    ctx = ActorContext(bus=bus, name=name, log=log, scheduler=prepared.scheduler, watcher=watcher, config=config)
    try:
        actor = _load(cfg["target"]).launch(ctx)
    except Exception as exc:  # noqa: BLE001 - reported to the host as this child's crash, then exit 1
        tb = format_traceback(exc, exc.__traceback__)
        report.append(ExitReport("", ExitKind.CRASH, type(exc).__name__, str(exc), tb))
    else:
        _relay_frames(dealer, feed, uplink, wake_r, actor, report, control)
        actor.finished.wait(FINISH_TIMEOUT)  # its watcher has written to the wake pipe by then
    rep = report[0]
    dealer.send_multipart([b"exit", codec.pack((rep.kind.value, rep.exc_type, rep.exc_message, rep.traceback))])
    dealer.close()  # lingers until the exit report is out
    for sock in (feed, uplink):
        sock.close(linger=0)
    control.close()
    os.close(wake_r)
    os.close(wake_w)
    return rep, bus


def _take_descriptor(frame: bytes, control: socket.socket) -> bytes:
    """The hand-off ``frame`` with this process's number of the descriptor the host sent just before it."""
    _, fds, _, _ = socket.recv_fds(control, 1, 1)
    if len(fds) != 1:
        raise SupervisionError(f"the host announced a connection hand-off but passed {len(fds)} descriptors")
    _, _, _, handed = decode_frame(frame)
    return encode_frame(Kind.TELL, 0, None, dataclasses.replace(handed, fd=fds[0]))


def _relay_frames(
    dealer: Any, feed: Any, uplink: Any, wake: int, actor: Any, report: list[ExitReport], control: socket.socket
) -> None:
    """Frames from the host to the actor's mailbox, and from the actor to the host, until it ends.

    A connection hand-off (``ConnectionHandedOff``) comes as an ``fd`` frame: its descriptor
    came just before it on the control socket, and the actor gets it under this process's number.
    """
    poller = zmq.Poller()
    poller.register(dealer, zmq.POLLIN)
    poller.register(uplink, zmq.POLLIN)
    poller.register(wake, zmq.POLLIN)
    while not report:
        for sock, _ in poller.poll():
            if sock is dealer:
                parts = dealer.recv_multipart()
                if parts[0] == b"msg":
                    feed.send(parts[1])
                elif parts[0] == b"fd":
                    feed.send(_take_descriptor(parts[1], control))
                elif parts[0] == b"stop":
                    actor.actor_ref.stop(block=False)
            elif sock is uplink:
                dealer.send_multipart(uplink.recv_multipart())
    while True:  # everything the actor sent before it ended goes out before the exit report
        try:
            dealer.send_multipart(uplink.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            break


class _Rehearsal(Actor):
    """The actor of a warm spare's dry run (:func:`_rehearse`): answers every request with Ok."""

    def handle(self, msg: Any) -> None:
        return None


def _rehearse(prepared: _Prepared) -> None:
    """A dry run of a child's life in a warm spare, before its assignment: the fork server's hook.

    A forked child pays a copy-on-write page fault (microseconds each on a VM) for
    every page of the fork server's memory it first writes, and CPython writes to
    every object it touches (reference counts). Setting up, starting an actor and
    answering a first request touch some hundreds of pages: :func:`_serve` runs
    here once, with :class:`_Rehearsal` and a host played by a thread over
    ``inproc://`` and an abstract Unix socket, so those pages are copied now and
    not on the way to the real child's first answer.
    """
    zctx = prepared.zctx
    address = f"inproc://_rehearsal-{os.getpid()}"
    router = zctx.socket(zmq.ROUTER)
    router.bind(address)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind("")  # an abstract name the kernel picks: nothing on disk, nothing to squat
    control.listen(1)
    ask = encode_frame(Kind.ASK, 1, "_rehearsal_reply", Ok())

    def host() -> None:
        identity, _, _ = router.recv_multipart()  # hello
        router.send_multipart([identity, b"msg", ask])
        router.recv_multipart()  # the reply
        router.send_multipart([identity, b"stop"])
        while router.recv_multipart()[1] != b"exit":  # the ack, then the exit report
            continue

    thread = threading.Thread(target=host, name="rehearsal-host", daemon=True)
    thread.start()
    cfg = {
        "target": f"{__name__}:_Rehearsal",
        "node": "_rehearsal",
        "name": "rehearsal",
        "address": address,
        "control": control.getsockname(),
        "config": {},
    }
    _, bus = _serve(cfg, prepared)
    thread.join(FINISH_TIMEOUT)
    bus.close_mailbox("rehearsal")
    router.close(linger=0)
    control.close()


child_main.prepare = _prepare_child  # type: ignore[attr-defined]  # the fork server's warm-spare hooks
child_main.rehearse = _rehearse  # type: ignore[attr-defined]


def _exit(status: int) -> None:
    """Leave the child at once: its sockets are closed, and the fork server reaps it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
