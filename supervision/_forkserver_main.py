"""The fork server process itself: ``python -m villagemesh.supervision._forkserver_main FD``.

Started by :meth:`villagemesh.supervision.forkserver.ForkServer.start` (read its
module docstring for the protocol and the rules). One thread, one loop::

    poll([channel, pidfd of every child])
      channel readable → frames: hello (once) · fork · refill · kill · quit; EOF → the node died
      channel writable → flush queued frames (writes never block: the node may be busy)
      pidfd readable   → waitpid → queue exited(pid, code)

Everything the node is sent is queued and written without blocking, so the
server keeps reaping and forking even when the node is slow to read; the node
only ever blocks on a server that is alive and reading.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import fcntl
import gc
import importlib
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from villagemesh.supervision.forkserver import (
    EXITED,
    FAILED,
    FORK,
    FORKED,
    HEADER,
    HELLO,
    KILL,
    KILLED,
    QUIT,
    READY,
    REFILL,
    REFUSED,
    FrameReader,
    encode_frame,
)

REHEARSAL_DELAY = 0.01
"""Seconds a prepared spare waits for its argument before it rehearses. A spare is forked
while the restart that used its predecessor is still under way: rehearsing at once would
take CPU from that restart (and in a burst of restarts delay its own start), so it waits
until the restart is long done, and skips the rehearsal if its argument comes first."""

_PR_SET_PDEATHSIG = 1
_F_GETPIPE_SZ = 1032


class _Refused(Exception):
    """A fork request cannot be served; ``kind`` says whose fault ("target" or "system")."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class _Spare:
    """A prepared child waiting for its argument on ``assignment`` (a pipe's write end)."""

    pid: int
    assignment: int


def _thread_count() -> int:
    """Threads of this process, native ones included (``threading`` sees only its own)."""
    return len(os.listdir("/proc/self/task"))


class _Server:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.reader = FrameReader()
        self.out = bytearray()
        self.poll = select.poll()
        self.poll.register(sock.fileno(), select.POLLIN)
        self.pidfds: dict[int, int] = {}  # pid -> pidfd
        self.by_pidfd: dict[int, int] = {}  # pidfd -> pid
        self.targets: dict[str, Callable[..., Any]] = {}
        self.warm: set[str] = set()
        self.spares: dict[str, collections.deque[_Spare]] = {}  # per warm target, oldest first
        self.pool = 1  # spares kept per warm target
        self.unassigned: set[int] = set()  # pids of spares not yet handed out
        self.tainted: str | None = None
        self.pid = os.getpid()
        # Looked up once here: in a child, building it (dlopen, a CDLL object) would cost a
        # hundred copy-on-write page faults, in every spare.
        self.prctl = ctypes.CDLL(None, use_errno=True).prctl

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until quit or EOF; kill every child on the way out. The exit status."""
        try:
            hello = self._first_frame()
            if hello is None:
                return 0
            if not self._start(hello):
                return 1
            self._flush()
            while True:
                for fd, events in self.poll.poll():
                    if fd == self.sock.fileno():
                        if events & select.POLLOUT:
                            self._flush()
                        if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and not self._read():
                            return 0
                    elif fd in self.by_pidfd:
                        self._reap(fd)
                self._flush()
        except (BrokenPipeError, ConnectionResetError):
            return 0  # the node is gone: nobody to report to
        finally:
            self._kill_all()

    def _first_frame(self) -> list[Any] | None:
        self.sock.setblocking(True)
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    return None
                frames = self.reader.feed(data)
                if frames:
                    if frames[0][0] != HELLO or len(frames) > 1:
                        raise SystemExit(f"fork server: expected one hello first, got {frames!r:.200}")
                    return frames[0]
        finally:
            self.sock.setblocking(False)

    def _start(self, hello: list[Any]) -> bool:
        _, preload, warm, path, self.pool = hello
        sys.path[:0] = [p for p in path if p not in sys.path]
        try:
            for module in ("zmq", "msgpack", *preload):
                self._import(module)
            for target in warm:
                self._resolve(target)
                self.warm.add(target)
        except _Refused as exc:
            self._queue([FAILED, str(exc)])
            self._flush(block=True)
            return False
        gc.freeze()  # what the server holds now is never collected: children do not copy it on write
        for target in self.warm:
            self._refill(target)
        self._queue([READY, self.pid])
        return True

    def _read(self) -> bool:
        """Read and handle what the node sent; False once it is time to stop."""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return True
            if not data:
                return False  # EOF: the node died or closed the channel
            for frame in self.reader.feed(data):
                if not self._handle(frame):
                    return False

    def _handle(self, frame: list[Any]) -> bool:
        tag = frame[0]
        if tag == FORK and len(frame) == 5:
            _, request, target, arg, refill = frame
            try:
                pid, warm = self._fork(target, arg)
            except _Refused as exc:
                self._queue([REFUSED, request, exc.kind, str(exc)])
            else:
                self._queue([FORKED, request, pid])
                if refill or not warm:
                    self._flush()  # the node learns its pid first; the next spare's fork can wait
                    self._refill(target)
            return True
        if tag == REFILL and len(frame) == 2:
            self._refill(frame[1])
            return True
        if tag == KILL and len(frame) == 4:
            _, request, pid, sig = frame
            self._queue([KILLED, request, self._kill(pid, sig)])
            return True
        if tag == QUIT:
            self._kill_all()
            self._flush(block=True)
            return False
        raise SystemExit(f"fork server: unknown request {frame!r:.200}")

    # -- requests ----------------------------------------------------------------------------

    def _import(self, module: str) -> None:
        if module in sys.modules:
            return
        try:
            importlib.import_module(module)
        except Exception as exc:  # any import failure is this request's error, reported to the node
            raise _Refused("target", f"importing {module!r} failed: {type(exc).__name__}: {exc}") from exc
        threads = _thread_count()
        if threads > 1:
            self.tainted = f"importing {module!r} started {threads - 1} thread(s); forking is no longer safe"
            raise _Refused("system", self.tainted)

    def _resolve(self, target: str) -> Callable[..., Any]:
        fn = self.targets.get(target)
        if fn is None:
            module, _, qualname = target.partition(":")
            self._import(module)
            obj: Any = sys.modules[module]
            for part in qualname.split("."):
                try:
                    obj = getattr(obj, part)
                except AttributeError as exc:
                    raise _Refused("target", f"module {module} has no attribute {qualname!r}") from exc
            if not callable(obj):
                raise _Refused("target", f"{qualname} is a {type(obj).__name__}, not callable")
            fn = self.targets[target] = obj
        return fn

    def _fork(self, target: str, arg: bytes) -> tuple[int, bool]:
        """The child's pid, and whether a warm spare took the argument (else it was forked cold)."""
        if self.tainted is not None:
            raise _Refused("system", self.tainted)
        fn = self._resolve(target)
        pool = self.spares.get(target, collections.deque())
        while pool and HEADER.size + len(arg) <= fcntl.fcntl(pool[0].assignment, _F_GETPIPE_SZ):
            spare = pool.popleft()  # the oldest: the most likely to be prepared by now
            try:
                # The pipe is empty and the argument fits: this write cannot block.
                os.write(spare.assignment, HEADER.pack(len(arg)) + arg)
                delivered = True
            except BrokenPipeError:
                delivered = False  # it died unassigned (its reap is still queued, silent): the next one
            os.close(spare.assignment)
            if delivered:
                self.unassigned.discard(spare.pid)
                return spare.pid, True
        return self._spawn(lambda: fn(arg)), False

    def _refill(self, target: str) -> None:
        """Fork spares of ``target`` until it has :attr:`pool` of them, if it is warm."""
        if target not in self.warm or self.tainted is not None:
            return
        pool = self.spares.setdefault(target, collections.deque())
        while len(pool) < self.pool and self._fork_spare(target, pool):
            continue

    def _fork_spare(self, target: str, pool: collections.deque[_Spare]) -> bool:
        fn = self.targets[target]
        read_end, write_end = os.pipe()
        try:
            pid = self._spawn(lambda: _run_spare(fn, read_end), keep=read_end, drop=write_end)
        except _Refused:
            os.close(write_end)
            return False  # no spare this time: the next request for the target forks cold
        finally:
            os.close(read_end)
        pool.append(_Spare(pid, write_end))
        self.unassigned.add(pid)
        return True

    def _spawn(self, call: Callable[[], Any], keep: int = -1, drop: int = -1) -> int:
        """Fork a child that runs ``call``; it keeps fd ``keep`` and closes ``drop`` and the server's fds."""
        try:
            pid = os.fork()
        except OSError as exc:
            raise _Refused("system", f"fork() failed: {exc}") from exc
        if pid == 0:
            self._become_child(call, keep, drop)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise _Refused("system", f"pidfd_open() failed: {exc}") from exc
        self.pidfds[pid] = pidfd
        self.by_pidfd[pidfd] = pid
        self.poll.register(pidfd, select.POLLIN)
        return pid

    def _become_child(self, call: Callable[[], Any], keep: int, drop: int) -> NoReturn:
        status = 1
        try:
            self.sock.close()
            for fd in [*self.by_pidfd, *(s.assignment for pool in self.spares.values() for s in pool), drop]:
                if fd not in (keep, -1):
                    os.close(fd)
            self.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != self.pid:
                os._exit(1)  # the server died before the line above: do not outlive it
            signal.signal(signal.SIGINT, signal.default_int_handler)
            call()
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, int | None):
                sys.stderr.write(f"{exc.code}\n")
        except BaseException:  # noqa: BLE001 - the child's last words go to stderr; its status says it
            traceback.print_exc()
        finally:
            with contextlib.suppress(OSError, ValueError):  # stdio may be closed; the status still tells
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)

    def _kill(self, pid: int, sig: int) -> bool:
        pidfd = self.pidfds.get(pid)
        if pidfd is None or pid in self.unassigned:
            return False
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            return False  # ended a moment ago; its exit notice is on its way
        return True

    def _reap(self, pidfd: int) -> None:
        pid = self.by_pidfd.pop(pidfd)
        del self.pidfds[pid]
        self.poll.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        if pid in self.unassigned:  # a spare died before it was handed out: the node never knew it
            self.unassigned.discard(pid)
            for pool in self.spares.values():
                for spare in [s for s in pool if s.pid == pid]:
                    os.close(spare.assignment)
                    pool.remove(spare)
            return
        self._queue([EXITED, pid, os.waitstatus_to_exitcode(status)])

    def _kill_all(self) -> None:
        for pool in self.spares.values():
            for spare in pool:
                os.close(spare.assignment)
        self.spares.clear()
        for pidfd in list(self.by_pidfd):
            with contextlib.suppress(ProcessLookupError):  # it ended already; reaped below all the same
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        for pidfd in list(self.by_pidfd):
            self._reap(pidfd)

    # -- output ------------------------------------------------------------------------------

    def _queue(self, frame: list[Any]) -> None:
        self.out += encode_frame(frame)

    def _flush(self, *, block: bool = False) -> None:
        """Write what is queued; without ``block``, only what the socket takes now."""
        if block:
            self.sock.setblocking(True)
            self.sock.settimeout(5.0)
        try:
            while self.out:
                try:
                    sent = self.sock.send(self.out)
                except (BlockingIOError, TimeoutError):
                    break
                del self.out[:sent]
        finally:
            if block:
                self.sock.setblocking(False)
        self.poll.modify(self.sock.fileno(), select.POLLIN | (select.POLLOUT if self.out else 0))


def _run_spare(fn: Callable[..., Any], assignment: int) -> None:
    """A warm spare: prepare; rehearse if no argument came within :data:`REHEARSAL_DELAY`; then
    wait for the argument on ``assignment`` (a pipe)."""
    prepare = getattr(fn, "prepare", None)
    prepared = prepare() if prepare is not None else None
    rehearse = getattr(fn, "rehearse", None)
    if rehearse is not None and not select.select([assignment], [], [], REHEARSAL_DELAY)[0]:
        rehearse(prepared)
    with os.fdopen(assignment, "rb") as pipe:
        header = pipe.read(HEADER.size)
        if len(header) < HEADER.size:
            return  # the server closed the pipe without an assignment: it is shutting down
        arg = pipe.read(HEADER.unpack(header)[0])
    if prepare is not None:
        fn(arg, prepared)
    else:
        fn(arg)


def main(argv: list[str]) -> int:
    """Serve the node on the inherited socket whose fd is ``argv[1]``."""
    fd = int(argv[1])
    os.set_inheritable(fd, False)  # children close it; anything they exec must not hold it either
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node decides when we stop
    return _Server(socket.socket(fileno=fd)).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
