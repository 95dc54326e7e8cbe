"""Functions the fork-server tests run in forked children (importable by the server)."""

from __future__ import annotations

import ctypes
import os
import sys
import threading


def write_pid(arg: bytes) -> None:
    """Write our pid and the thread count to the path in ``arg``, then wait to be killed."""
    with open(arg.decode(), "w") as out:
        out.write(f"{os.getpid()} {threading.active_count()}\n")
    threading.Event().wait(60)


def raise_error(arg: bytes) -> None:
    """Fail with a Python exception (exit status 1)."""
    raise RuntimeError(f"child failed on purpose: {arg!r}")


def segfault(arg: bytes) -> None:
    """Die of SIGSEGV."""
    ctypes.string_at(0)


def exit_with(arg: bytes) -> None:
    """Exit with the status in ``arg``."""
    sys.stdout.flush()
    os._exit(int(arg))


not_callable = 42
