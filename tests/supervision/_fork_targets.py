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


def _prepare_report() -> dict[str, int]:
    """Runs in the warm spare before it has its assignment."""
    return {"prepared_in": os.getpid()}


def report_prepared(arg: bytes, prepared: dict[str, int] | None = None) -> None:
    """Write whether (and where) prepare ran, then exit."""
    with open(arg.decode(), "w") as out:
        out.write(f"{os.getpid()} {prepared['prepared_in'] if prepared else 0}\n")


report_prepared.prepare = _prepare_report  # type: ignore[attr-defined]
