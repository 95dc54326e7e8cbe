"""A single-threaded fork server: cheap, safe restarts of process-isolated children.

A node process has threads (pykka, zmq's I/O threads) and a zmq Context, and
neither survives ``fork()``; a fresh interpreter per restart costs tens of
milliseconds of start-up and imports. So the node starts this server once, as
a *fresh interpreter* (``python -m villagemesh.supervision._forkserver_main``),
which imports ``zmq``, ``msgpack`` and the preloads once, creates no zmq
Context and no thread, and then only ever forks::

    node process (threads, zmq Context)      fork server (one thread, no Context)
    ForkServer ── fork(req, target, arg, refill) ─►  import target once; fork() ──► child: target(arg)
               ◄── forked(req, pid) ───────────   pidfd_open(child), polled with the channel
               ◄── exited(pid, code) ──────────   pidfd readable → waitpid → notice at once
               ── refill(target) ──────────────►  fork the warm target's next spares (no reply)
               ── kill(req, pid, sig) ─────────►  pidfd_send_signal (no pid-reuse race)
               ◄── killed(req, delivered) ─────

The channel is a Unix socketpair inherited by the server (``pass_fds``). Every
frame is a 4-byte big-endian length and a msgpack array whose first element is
its tag (no pickle). Replies carry the request id they answer; exit notices
carry a pid and are never an answer to anything: the two cannot be confused,
and the server writes ``forked`` for a pid before that pid's ``exited``.

Node side: no reader thread. Whoever needs a frame (``fork`` waiting for its
reply, ``wait_exit``, ``read_exits``) becomes the one reader for a while
(leader/followers under one condition variable); the others wait on the
condition and are woken by what the reader files. ``fileno()`` is an epoll fd
that is readable when the channel has bytes *or* filed exits are unread, so an
owner can ``select``/``zmq.Poller`` on it and then call ``read_exits()``
without missing an exit that another thread's read took off the socket.

Exit codes: ``0``.. the child's status (``target`` returned: 0; raised: 1, with
the traceback on stderr; ``sys.exit(n)``: n), ``-N`` when signal N killed it.

Warm spares: for targets named in ``warm`` the server keeps ``spares``
children (one by default) already forked and prepared (the target's
``prepare`` attribute, if any, has run: a zmq Context made, threads started),
waiting on a pipe for its argument. A fork of such a target hands the argument
to the oldest spare at once and then forks the next spare, so a restart waits
neither for a fork nor for the child's set-up; the target is then called as
``target(arg, prepared)`` (a cold fork calls ``target(arg)``). The next
spare's fork and set-up take CPU from the child just handed out (on two cores,
noticeably): ``fork(..., refill=False)`` leaves it until the node calls
``refill(target)``, e.g. once that child is up; a fork that found no spare
refills at once all the same. A target may also have a ``rehearse`` attribute:
a spare whose argument has not come a moment after ``prepare`` calls
``rehearse(prepared)`` once, to run through its own code paths before they are
needed (a forked child pays a copy-on-write fault for each page of the
server's memory it first writes; see
:func:`villagemesh.supervision.process._rehearse`). A spare that dies before
its assignment is not replaced until the next request for its target (which is
then forked cold): a crashing ``prepare`` cannot become a fork loop. Spares
are invisible to the node: their exits are reported only once they were handed
out.

Lifetime: ``close()`` asks the server to kill its children (their exits are
reported) and exit. When the node dies, even by ``kill -9``, the server reads
EOF on the channel, kills its children and exits. Children also get
``PR_SET_PDEATHSIG = SIGKILL`` as a second line (safe there: the server has one
thread, and the signal fires when the *thread* that forked them ends, which is
also why the server itself does not use it: the node's starting thread may end
first). The server runs in its own process group, so a Ctrl-C at the node's
terminal reaches only the node, which decides when children stop.

Limits: a module imported into the server (a preload, or a target's module on
first use: it is imported in the server so that later forks are free) must not
start threads at import time; the server counts its threads after each import
and, if there are more than one, refuses every fork from then on (a fork of a
multi-threaded process can inherit a held lock). Linux only (pidfds, epoll,
eventfd, ``/proc``), as villagemesh is.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack

from villagemesh.errors import ChildSpecError, ConfigError, SupervisionError

__all__ = ["MAX_FRAME", "ChildExit", "ForkServer", "FrameReader", "encode_frame"]

# -- the channel's frames (shared with _forkserver_main) ----------------------------------------

HEADER = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024
"""A frame carries a target name and a child's argument (its config): far below this."""

# Tags: node → server
HELLO = "hello"  # [HELLO, preload: list[str], warm: list[str], sys_path: list[str], spares: int]
FORK = "fork"  # [FORK, req, target, arg, refill: bool]
REFILL = "refill"  # [REFILL, target]: fork the target's next warm spare (no reply)
KILL = "kill"  # [KILL, req, pid, sig]
QUIT = "quit"  # [QUIT]
# Tags: server → node
READY = "ready"  # [READY, server_pid]
FAILED = "failed"  # [FAILED, message]: start-up failed, the server exits
FORKED = "forked"  # [FORKED, req, pid]
KILLED = "killed"  # [KILLED, req, delivered: bool]
REFUSED = "refused"  # [REFUSED, req, kind ("target" | "system"), message]
EXITED = "exited"  # [EXITED, pid, returncode]

_REPLIES = {FORKED: 3, KILLED: 3, REFUSED: 4}
_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")

START_TIMEOUT = 30.0
"""Seconds the server may take to start and import its preloads (a cold disk is slow)."""

REQUEST_TIMEOUT = 10.0
"""Seconds a request may take (a fork is milliseconds; this only catches a stuck server)."""

EXIT_MEMORY = 4096
"""Exits remembered for ``wait_exit``; the oldest go first (a node restarts far fewer children at once)."""

_T = TypeVar("_T")


def encode_frame(frame: list[Any]) -> bytes:
    """One frame: length prefix and msgpack array."""
    body = msgpack.packb(frame, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ConfigError(f"fork server frame of {len(body)} bytes exceeds {MAX_FRAME} ({frame[0]!r})")
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Incremental decoder of the channel's frames: bytes in any chunking, frames out.

    An oversized length is rejected before its body is buffered; anything that is
    not a msgpack array starting with a string tag is a :class:`SupervisionError`.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[list[Any]]:
        """Add ``data``; return every frame now complete, in order."""
        self._buf += data
        frames: list[list[Any]] = []
        while len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length > MAX_FRAME:
                raise SupervisionError(f"fork server channel: frame of {length} bytes exceeds {MAX_FRAME}")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            body = bytes(self._buf[HEADER.size : end])
            del self._buf[:end]
            try:
                frame = msgpack.unpackb(body, raw=False)
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                raise SupervisionError(f"fork server channel: undecodable frame {body[:32]!r}: {exc}") from exc
            if not (isinstance(frame, list) and frame and isinstance(frame[0], str)):
                raise SupervisionError(f"fork server channel: frame {frame!r:.80} is not a tagged array")
            frames.append(frame)
        return frames


# -- the node's side ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChildExit:
    """A child's end: ``returncode`` is its exit status, or ``-N`` when signal N killed it."""

    pid: int
    returncode: int


def _check_target(target: str) -> None:
    if not (isinstance(target, str) and _TARGET.fullmatch(target)):
        raise ChildSpecError(f"fork target must be 'package.module:function', got {target!r}")


class ForkServer:
    """The node's handle on its fork server: ask it to fork, learn of exits at once.

    Thread-safe: any thread may call any method. Build it with :meth:`start`.
    """

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self._proc = proc
        self._sock = sock
        self._frames = FrameReader()
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._reading = False
        self._next_id = 0
        self._waiting: set[int] = set()
        self._replies: dict[int, list[Any]] = {}
        self._exits: collections.OrderedDict[int, ChildExit] = collections.OrderedDict()
        self._unread: list[ChildExit] = []
        self._server_pid: int | None = None
        self._start_failure: str | None = None
        self._gone: str | None = None
        self._closed = False
        self._fds_closed = False
        self._event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        self._epoll.register(self._event, select.EPOLLIN)

    @classmethod
    def start(
        cls, preload: Sequence[str] = (), *, warm: Sequence[str] = (), spares: int = 1, python: str = sys.executable
    ) -> ForkServer:
        """Start a server that imports ``preload`` once and keeps ``spares`` spares for each ``warm`` target.

        Returns when the server is ready. The server resolves modules with this
        process's ``sys.path`` when ``python`` is this interpreter. Raises
        :class:`ConfigError` for an unusable ``python``, preload or ``spares``,
        :class:`ChildSpecError` for a malformed warm target, and
        :class:`SupervisionError` if the server dies or does not answer.
        """
        for target in warm:
            _check_target(target)
        if isinstance(spares, bool) or not isinstance(spares, int) or spares < 1:
            raise ConfigError(f"fork server spares must be an int >= 1, got {spares!r}")
        for module in preload:
            if not (isinstance(module, str) and re.fullmatch(r"[A-Za-z_][\w.]*", module)):
                raise ConfigError(f"fork server preload must be a module name, got {module!r}")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                [python, "-m", "villagemesh.supervision._forkserver_main", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                process_group=0,  # terminal signals reach the node only; the node decides
            )
        except OSError as exc:
            ours.close()
            raise ConfigError(f"cannot start a fork server with python {python!r}: {exc}") from exc
        finally:
            theirs.close()
        server = cls(proc, ours)
        try:
            path = list(sys.path) if os.path.realpath(python) == os.path.realpath(sys.executable) else []
            server._send([HELLO, list(preload), list(warm), path, spares])
            server._await(lambda: True if server._server_pid or server._start_failure else None, START_TIMEOUT)
        except SupervisionError:
            server.close()
            raise
        if server._server_pid is None:
            server.close()
            if server._start_failure is not None:
                raise ConfigError(f"fork server (pid {proc.pid}) could not start: {server._start_failure}")
            raise SupervisionError(f"fork server (pid {proc.pid}) was not ready within {START_TIMEOUT} s")
        return server

    @property
    def pid(self) -> int:
        """The server's own pid."""
        return self._proc.pid

    def fileno(self) -> int:
        """An fd readable while exit notices may be waiting: poll it, then call :meth:`read_exits`."""
        return self._epoll.fileno()

    def fork(self, target: str, arg: bytes, *, refill: bool = True) -> int:
        """Fork a child that calls ``target(arg)`` (``"package.module:function"``); its pid.

        For a warm target, ``refill=False`` leaves the next spare to :meth:`refill`
        (unless this fork found no spare: then it follows at once, as by default).
        Raises :class:`ChildSpecError` naming the target if it is malformed, cannot
        be imported or is not callable (the server lives on), and
        :class:`SupervisionError` if the server is gone or refuses (e.g. out of processes).
        """
        _check_target(target)
        if not isinstance(arg, bytes):
            raise ConfigError(f"fork argument for {target} must be bytes, got {type(arg).__name__}")
        reply = self._request([FORK, target, arg, bool(refill)], f"a fork of {target}")
        if reply[0] == REFUSED:
            if reply[2] == "target":
                raise ChildSpecError(f"fork server cannot run {target!r}: {reply[3]}")
            raise SupervisionError(f"fork server (pid {self.pid}) could not fork {target!r}: {reply[3]}")
        return int(reply[2])

    def refill(self, target: str) -> None:
        """Fork spares of warm ``target`` until it has its number again (a fork made with
        ``refill=False`` left that for later). Does not wait; SupervisionError if the server is gone."""
        _check_target(target)
        self._send([REFILL, target])

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> bool:
        """Signal child ``pid`` through the server's pidfd (never a reused pid); False if it already ended.

        ``os.kill(pid, sig)`` from the node works too, with the usual pid-reuse caveat.
        """
        reply = self._request([KILL, int(pid), int(sig)], f"a kill of child {pid}")
        return bool(reply[2])

    def read_exits(self) -> list[ChildExit]:
        """Exits reported since the last call, without blocking (after :meth:`fileno` polled readable).

        Raises :class:`SupervisionError` once the server is gone and every exit was read.
        """
        with self._cond:
            if not self._reading and self._gone is None and not self._fds_closed:
                self._read_locked(0.0)
            exits, self._unread = self._unread, []
            if not self._fds_closed:
                with contextlib.suppress(BlockingIOError):  # zero already: no exit was signalled
                    os.eventfd_read(self._event)
            if not exits and self._gone is not None:
                raise SupervisionError(self._gone_message())
            return exits

    def wait_exit(self, pid: int, timeout: float) -> ChildExit | None:
        """The exit of child ``pid`` once reported; None if not within ``timeout`` seconds.

        Raises :class:`SupervisionError` if the server is gone and never reported it.
        """
        return self._await(lambda: self._exits.get(pid), timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the server; it kills (and reports) every child it forked. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        try:
            self._send([QUIT])
        except SupervisionError:
            self._proc.kill()  # the channel is broken: nothing else can reach the server
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()  # its children die with it (PR_SET_PDEATHSIG)
            self._proc.wait()
        with self._cond:
            # The server has exited, so the channel ends in EOF: file the last exits.
            deadline = time.monotonic() + timeout
            while self._gone is None and (remaining := deadline - time.monotonic()) > 0:
                if self._reading:
                    self._cond.wait(remaining)
                else:
                    self._read_locked(remaining)
            self._gone = self._gone or "closed"
            self._cond.wait_for(lambda: not self._reading, timeout)
            self._fds_closed = True
            self._epoll.close()
            os.close(self._event)
            self._sock.close()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the channel ---------------------------------------------------------------------------

    def _send(self, frame: list[Any]) -> None:
        data = encode_frame(frame)
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except OSError as exc:
                raise SupervisionError(f"{self._gone_message()}: {exc}") from exc

    def _request(self, body: list[Any], what: str) -> list[Any]:
        with self._cond:
            if self._closed:
                raise SupervisionError(f"fork server (pid {self.pid}) is closed; cannot do {what}")
            if self._gone is not None:
                raise SupervisionError(self._gone_message())
            self._next_id += 1
            request = self._next_id
            self._waiting.add(request)
        try:
            self._send([body[0], request, *body[1:]])
            reply = self._await(lambda: self._replies.pop(request, None), REQUEST_TIMEOUT)
        finally:
            with self._cond:
                self._waiting.discard(request)
        if reply is None:
            raise SupervisionError(f"fork server (pid {self.pid}) did not answer {what} within {REQUEST_TIMEOUT} s")
        return reply

    def _await(self, ready: Callable[[], _T | None], timeout: float) -> _T | None:
        """Wait until ``ready()`` is not None, reading the channel when no other thread does."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = ready()
                if value is not None:
                    return value
                if self._gone is not None:
                    raise SupervisionError(self._gone_message())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if self._reading or self._fds_closed:
                    self._cond.wait(remaining)
                else:
                    self._read_locked(remaining)

    def _read_locked(self, timeout: float) -> None:
        """Be the reader for up to ``timeout`` s; called holding the condition, not reading."""
        self._reading = True
        self._cond.release()
        frames: list[list[Any]] = []
        error: str | None = None
        try:
            frames, error = self._receive(timeout)
        finally:
            self._cond.acquire()
            self._reading = False
            self._cond.notify_all()
        for frame in frames:
            self._file(frame)
        if error is not None and self._gone is None:
            self._gone = error
        self._cond.notify_all()

    def _receive(self, timeout: float) -> tuple[list[list[Any]], str | None]:
        """Frames that arrive within ``timeout`` (all that are there once any are); error if the channel ended."""
        try:
            ready, _, _ = select.select([self._sock], [], [], timeout)
            if not ready:
                return [], None
            frames: list[list[Any]] = []
            while True:
                try:
                    data = self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return frames, None
                if not data:
                    return frames, "the channel reached EOF"
                frames += self._frames.feed(data)
        except (OSError, SupervisionError) as exc:
            return [], f"{type(exc).__name__}: {exc}"

    def _file(self, frame: list[Any]) -> None:
        """Put one server frame where its reader looks for it (condition held)."""
        tag = frame[0]
        if tag == EXITED and len(frame) == 3:
            ended = ChildExit(int(frame[1]), int(frame[2]))
            self._exits[ended.pid] = ended
            while len(self._exits) > EXIT_MEMORY:
                self._exits.popitem(last=False)
            if not self._unread:
                os.eventfd_write(self._event, 1)
            self._unread.append(ended)
        elif _REPLIES.get(tag) == len(frame):
            request = int(frame[1])
            if request in self._waiting:
                if tag == FORKED:
                    self._exits.pop(int(frame[2]), None)  # a reused pid: its old exit is not this child's
                self._replies[request] = frame
            elif tag == FORKED:
                # Its asker gave up waiting: nobody knows this child, so it must not live.
                self._kill_orphan(int(frame[2]))
        elif tag == READY and len(frame) == 2:
            self._server_pid = int(frame[1])
        elif tag == FAILED and len(frame) == 2:
            self._start_failure = str(frame[1])
        else:
            self._gone = f"it sent an unknown frame {frame!r:.80}"

    def _kill_orphan(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return  # it ended already; its exit notice follows

    def _gone_message(self) -> str:
        return f"fork server (pid {self.pid}, exit status {self._proc.poll()}) is gone: {self._gone or 'closed'}"
