"""A single-threaded fork server: cheap, safe restarts of process-isolated children.

A node process has threads (pykka, zmq's I/O threads) and a zmq Context, and
neither survives ``fork()``; a fresh interpreter per restart costs tens of
milliseconds of start-up and imports. So the node starts this server once, as
a *fresh interpreter* (``python -m villagemesh.supervision.forkserver``), which
imports what children need and then only ever forks::

    node process                         fork server (single thread, no zmq Context)
    ForkServer ──"fork" target arg──►    import target once; fork() ──► child: target(arg)
               ◄──"forked" pid───────    pidfd_open(child)
               ◄──"exited" pid code──    pidfd readable → waitpid → report at once

The channel is a Unix socketpair; every frame is a 4-byte big-endian length
and a msgpack array (no pickle). Replies and exit notices share it and are
told apart by their first element. On the node side one reader thread turns
them into answered requests and an exit table with a condition variable.

Warm spares: for targets named in ``warm``, the server keeps one child
already forked and prepared (the target's ``prepare`` attribute, if any, has
run: a zmq Context made, threads started, memory touched), waiting on a pipe
for its assignment. A fork request for such a target hands the argument to
the spare at once and forks the next spare afterwards, so a restart does not
wait for a fork or for a fresh child's set-up. The target is then called as
``target(arg, prepared)``.

Lifetime: the server exits, killing its children, when the node asks it to or
when the channel reaches EOF (the node died, even by ``kill -9``). Children
get ``PR_SET_PDEATHSIG = SIGKILL`` so they do not outlive the server.

A module imported into the server must not start threads at import time
(the server must stay single-threaded for ``fork()`` to be safe); the ones
villagemesh preloads do not.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from villagemesh.errors import ConfigError, SupervisionError

__all__ = ["ChildExit", "ForkServer"]

_LEN = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024
"""A fork request carries a target name and a child's config: far below this."""

START_TIMEOUT = 30.0
"""Seconds the server may take to start and import its preloads."""

REQUEST_TIMEOUT = 10.0
"""Seconds a fork request may take (a fork is milliseconds; this is for a stuck server)."""


@dataclass(frozen=True)
class ChildExit:
    """A child's end: ``returncode`` is its exit status, or ``-N`` when signal N killed it."""

    pid: int
    returncode: int


def _send_frame(sock: socket.socket, obj: Any) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv_frame(sock: socket.socket) -> Any:
    header = _recv_exact(sock, _LEN.size)
    if header is None:
        return None
    (length,) = _LEN.unpack(header)
    if length > MAX_FRAME:
        raise SupervisionError(f"fork server frame of {length} bytes exceeds {MAX_FRAME}")
    body = _recv_exact(sock, length)
    if body is None:
        return None
    return msgpack.unpackb(body, raw=False)


class ForkServer:
    """The node side: start the server, ask it to fork, learn of exits at once."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self._proc = proc
        self._sock = sock
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: dict[int, Any] = {}
        self._exits: dict[int, ChildExit] = {}
        self._next_id = 0
        self._closed = False
        self._reader_error: str | None = None
        self._listeners: list[Callable[[ChildExit], None]] = []
        self._reader = threading.Thread(target=self._read, name="forkserver-reader", daemon=True)
        self._reader.start()

    @classmethod
    def start(
        cls, preload: Sequence[str] = (), *, warm: Sequence[str] = (), python: str = sys.executable
    ) -> ForkServer:
        """Start a fork server that imports ``preload`` once and keeps a warm spare for each
        target in ``warm``; returns when it is ready."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        args = [*preload, *(f"--warm={t}" for t in warm)]
        proc = subprocess.Popen(
            [python, "-m", "villagemesh.supervision.forkserver", str(theirs.fileno()), *args],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        ours.settimeout(START_TIMEOUT)
        try:
            hello = _recv_frame(ours)
        except (TimeoutError, OSError) as exc:
            proc.kill()
            raise SupervisionError(f"fork server (pid {proc.pid}) did not start: {exc}") from exc
        if not (isinstance(hello, list) and hello[:1] == ["ready"]):
            proc.kill()
            proc.wait()
            raise SupervisionError(f"fork server (pid {proc.pid}) failed to start: {hello!r}, exit {proc.returncode}")
        ours.settimeout(None)
        return cls(proc, ours)

    @property
    def pid(self) -> int:
        """The server's own pid."""
        return self._proc.pid

    def fork(self, target: str, arg: bytes) -> int:
        """Fork a child that calls ``target(arg)`` (``"package.module:function"``); its pid."""
        if ":" not in target:
            raise ConfigError(f"fork target must be 'module:function', got {target!r}")
        with self._cond:
            self._check_alive()
            self._next_id += 1
            request = self._next_id
        with self._send_lock:
            try:
                _send_frame(self._sock, ["fork", request, target, arg])
            except OSError as exc:
                raise SupervisionError(f"fork server (pid {self.pid}) is gone: {exc}") from exc
        with self._cond:
            if not self._cond.wait_for(
                lambda: request in self._replies or self._reader_error is not None, REQUEST_TIMEOUT
            ):
                raise SupervisionError(f"fork server (pid {self.pid}) did not answer a fork of {target}")
            self._check_alive(request)
            kind, value = self._replies.pop(request)
        if kind == "error":
            raise ConfigError(f"fork server cannot run {target}: {value}")
        return int(value)

    def wait_exit(self, pid: int, timeout: float) -> ChildExit | None:
        """The exit of child ``pid`` once the server reported it (None if not within ``timeout``)."""
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits or self._reader_error is not None, timeout)
            return self._exits.get(pid)

    def add_exit_listener(self, fn: Callable[[ChildExit], None]) -> None:
        """Call ``fn(exit)`` in the reader thread for every child exit (keep it short)."""
        self._listeners.append(fn)

    def _check_alive(self, request: int | None = None) -> None:
        if self._closed:
            raise SupervisionError("fork server is closed")
        if self._reader_error is not None and (request is None or request not in self._replies):
            raise SupervisionError(
                f"fork server (pid {self.pid}) is gone ({self._reader_error}); exit {self._proc.poll()}"
            )

    def _read(self) -> None:
        while True:
            try:
                frame = _recv_frame(self._sock)
            except (OSError, ValueError, SupervisionError) as exc:
                frame, error = None, f"{type(exc).__name__}: {exc}"
            else:
                error = "channel closed"
            if frame is None:
                with self._cond:
                    self._reader_error = error
                    self._cond.notify_all()
                return
            if frame[0] == "exited":
                ended = ChildExit(int(frame[1]), int(frame[2]))
                with self._cond:
                    self._exits[ended.pid] = ended
                    if len(self._exits) > 10_000:  # bounded: old exits nobody asked for go first
                        self._exits.pop(next(iter(self._exits)))
                    self._cond.notify_all()
                for fn in list(self._listeners):
                    fn(ended)
            else:
                with self._cond:
                    self._replies[int(frame[1])] = (frame[0], frame[2])
                    self._cond.notify_all()

    def close(self) -> None:
        """Stop the server; it kills every child it forked."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        with self._send_lock, contextlib.suppress(OSError):
            _send_frame(self._sock, ["quit"])
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._sock.close()
        self._reader.join(2)

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the server process ---------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _resolve(target: str, cache: dict[str, Callable[[bytes], Any]]) -> Callable[[bytes], Any]:
    fn = cache.get(target)
    if fn is None:
        module_name, _, qualname = target.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if not callable(obj):
            raise TypeError(f"{target} is not callable")
        fn = cache[target] = obj
    return fn


def _child_setup(sock: socket.socket) -> None:
    sock.close()
    _die_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)


def _finish_child(call: Callable[[], Any]) -> None:
    status = 0
    try:
        call()
    except BaseException:  # noqa: BLE001 - the child's last words go to stderr, and its exit status says it
        traceback.print_exc()
        status = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _run_child(sock: socket.socket, fn: Callable[..., Any], arg: bytes) -> None:
    _child_setup(sock)
    _finish_child(lambda: fn(arg))


def _run_spare(sock: socket.socket, fn: Callable[..., Any], assignment: int) -> None:
    """A warm spare: prepare, then wait for the argument on ``assignment`` (a pipe)."""
    _child_setup(sock)

    def run() -> None:
        prepare = getattr(fn, "prepare", None)
        prepared = prepare() if prepare is not None else None
        with os.fdopen(assignment, "rb") as pipe:
            header = pipe.read(_LEN.size)
            if len(header) < _LEN.size:
                return  # the server closed the pipe without an assignment: it is shutting down
            arg = pipe.read(_LEN.unpack(header)[0])
        fn(arg, prepared) if prepare is not None else fn(arg)

    _finish_child(run)


@dataclass
class _Spare:
    pid: int
    pidfd: int
    assignment: int


def _fork_spare(sock: socket.socket, fn: Callable[..., Any], children: dict[int, int]) -> _Spare:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write_end)
        _run_spare(sock, fn, read_end)
    os.close(read_end)
    pidfd = os.pidfd_open(pid)
    children[pidfd] = pid
    return _Spare(pid, pidfd, write_end)


def serve(fd: int, args: Sequence[str]) -> None:
    """The server's loop: fork on request (from a warm spare when there is one), report every exit at once."""
    import gc

    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node decides when we stop
    preload = [a for a in args if not a.startswith("--warm=")]
    warm = [a.removeprefix("--warm=") for a in args if a.startswith("--warm=")]
    cache: dict[str, Callable[..., Any]] = {}
    for module in preload:
        importlib.import_module(module)
    children: dict[int, int] = {}  # pidfd -> pid
    spares: dict[str, _Spare] = {}
    for target in warm:
        fn = _resolve(target, cache)
        gc.freeze()  # what the server holds now is never collected: children do not copy it on write
        spares[target] = _fork_spare(sock, fn, children)
    gc.freeze()
    _send_frame(sock, ["ready", os.getpid()])
    try:
        while True:
            readable, _, _ = select.select([sock, *children], [], [])
            for fd_ready in readable:
                if fd_ready is sock:
                    frame = _recv_frame(sock)
                    if frame is None or frame[0] == "quit":
                        return
                    _, request, target, arg = frame
                    try:
                        fn = _resolve(target, cache)
                    except Exception as exc:  # noqa: BLE001 - reported to the node as this request's error
                        _send_frame(sock, ["error", request, f"{type(exc).__name__}: {exc}"])
                        continue
                    spare = spares.pop(target, None)
                    if spare is not None:
                        os.write(spare.assignment, _LEN.pack(len(arg)) + arg)
                        os.close(spare.assignment)
                        _send_frame(sock, ["forked", request, spare.pid])
                        spares[target] = _fork_spare(sock, fn, children)  # the next restart's spare
                        continue
                    pid = os.fork()
                    if pid == 0:
                        _run_child(sock, fn, arg)
                    children[os.pidfd_open(pid)] = pid
                    _send_frame(sock, ["forked", request, pid])
                elif fd_ready in children:
                    pid = children.pop(fd_ready)
                    os.close(fd_ready)
                    _, status = os.waitpid(pid, 0)
                    _send_frame(sock, ["exited", pid, os.waitstatus_to_exitcode(status)])
                    for target, spare in list(spares.items()):
                        if spare.pid == pid:  # a spare died before its assignment: make another
                            os.close(spare.assignment)
                            spares[target] = _fork_spare(sock, cache[target], children)
    finally:
        for spare in spares.values():
            os.close(spare.assignment)
        for pidfd, pid in children.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            os.close(pidfd)


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2:])
