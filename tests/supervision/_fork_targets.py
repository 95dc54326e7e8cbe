"""Functions the fork-server tests run in forked children (importable by the server).

Children report to the test over an abstract Unix socket named in their argument,
so a test waits on an ``accept``, never on a sleep.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading

import zmq


def _report(address: bytes, text: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(b"\0" + address)
    sock.sendall(f"{text}\n".encode())
    return sock


def report(arg: bytes) -> None:
    """Report ``pid ppid threads`` to the test, then live until the test hangs up."""
    sock = _report(arg, f"{os.getpid()} {os.getppid()} {threading.active_count()}")
    sock.recv(1)  # EOF: the test is done with us
    sock.close()


def zmq_hello(arg: bytes) -> None:
    """Connect a DEALER to the caller's ROUTER at ``arg``, say hello, answer every ping with our pid."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 1_000)
    dealer.connect(arg.decode())
    pid = str(os.getpid()).encode()
    dealer.send_multipart([b"hello", pid])
    while dealer.recv() == b"ping":
        dealer.send_multipart([b"pong", pid])
    dealer.close()
    ctx.term()


def raise_error(arg: bytes) -> None:
    """Fail with a Python exception (exit status 1)."""
    raise RuntimeError(f"child failed on purpose: {arg!r}")


def segfault(arg: bytes) -> None:
    """Die of SIGSEGV, as a native crash in a BLE stack would."""
    ctypes.string_at(0)


def exit_with(arg: bytes) -> None:
    """Exit at once with the status in ``arg``."""
    sys.stdout.flush()
    os._exit(int(arg))


def sys_exit(arg: bytes) -> None:
    """Leave through ``sys.exit`` with the status in ``arg``."""
    sys.exit(int(arg))


not_callable = 42


def _prepare_report() -> dict[str, int]:
    """Runs in the warm spare before it has its assignment."""
    return {"prepared_in": os.getpid()}


def report_prepared(arg: bytes, prepared: dict[str, int] | None = None) -> None:
    """Report ``pid prepared_in`` (0 when cold) to the test, then exit."""
    _report(arg, f"{os.getpid()} {prepared['prepared_in'] if prepared else 0}").close()


report_prepared.prepare = _prepare_report  # type: ignore[attr-defined]


def _prepare_gated() -> dict[str, int]:
    """A spare's prepare; with ``VILLAGEMESH_TEST_GATE`` set, it reports its pid to the test and
    returns only when the test says so (after the test's fork request has handed it its argument)."""
    if os.environ.get("VILLAGEMESH_TEST_GATE"):
        gate = _report(os.environ["VILLAGEMESH_TEST_REPORTS"].encode(), str(os.getpid()))
        gate.recv(1)
        gate.close()
    return {"rehearsed": 0}


def _rehearse_mark(prepared: dict[str, int]) -> None:
    """A spare's rehearsal: marks ``prepared`` and reports ``pid 1`` to the test."""
    prepared["rehearsed"] = 1
    _report(os.environ["VILLAGEMESH_TEST_REPORTS"].encode(), f"{os.getpid()} 1").close()


def report_rehearsal(arg: bytes, prepared: dict[str, int] | None = None) -> None:
    """Report ``pid rehearsed`` (1 if this spare rehearsed before its assignment), then exit."""
    _report(arg, f"{os.getpid()} {prepared['rehearsed'] if prepared else 0}").close()


report_rehearsal.prepare = _prepare_gated  # type: ignore[attr-defined]
report_rehearsal.rehearse = _rehearse_mark  # type: ignore[attr-defined]
