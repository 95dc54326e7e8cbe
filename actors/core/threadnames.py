"""OS names for a node's threads, so that ``top -H``, ``ps -L``, ``perf`` and ``py-spy`` show which is which.

Python names its threads only for itself (``threading.Thread.name``); the
kernel sees every thread of a node as ``python``. Each thread the kit starts
(an actor's, a loop an actor owns, the timer thread) gives the kernel a short
form of its Python name, at most 15 bytes (Linux's limit)::

    RetrierActor-2            ->  Retrier-2
    Libp2pActor:libp2p-loop   ->  Libp2p:loop
    WebSocketActor:websocket-loop -> WebSocket:loop

Linux only (``prctl(PR_SET_NAME)``, per thread); elsewhere nothing is named,
and nothing else depends on the names.
"""

from __future__ import annotations

import re
import sys
import threading

from villagemesh.actors.core.libc import libc_function

__all__ = ["OS_NAME_BYTES", "name_this_thread", "os_name"]

OS_NAME_BYTES = 15
"""The longest thread name Linux keeps (16 bytes with the terminating NUL)."""

_PR_SET_NAME = 15


def os_name(name: str) -> str:
    """The short form of the Python thread name ``name`` (see the module docstring)."""
    owner, colon, own = name.partition(":")
    short = re.sub(r"Actor(?=-|$)", "", owner, count=1)
    if colon:
        own = own.removeprefix(short.lower() + "-")
        short = f"{short}:{own}"
    return short.encode("utf-8")[:OS_NAME_BYTES].decode("utf-8", "ignore")


_PRCTL = libc_function("prctl") if sys.platform.startswith("linux") else None


def name_this_thread() -> None:
    """Give the calling thread its OS name (:func:`os_name` of its Python name); Linux only."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_NAME, os_name(threading.current_thread().name).encode("utf-8"), 0, 0, 0)
