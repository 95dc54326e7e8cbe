"""Actors the supervision tests start (module level, so process children can import them too)."""

from __future__ import annotations

import os
import socket
import threading
from collections import defaultdict
from dataclasses import dataclass

from villagemesh.actors.core import codec
from villagemesh.actors.core.base import Actor

COUNTERS: defaultdict[str, int] = defaultdict(int)
RECEIVED: defaultdict[str, list[int]] = defaultdict(list)
LOCK = threading.Lock()
RELEASE = threading.Event()
"""A "hang" crash waits on this (tests set it when done, so no thread outlives them)."""


@codec.message("test.Ping")
@dataclass(frozen=True, slots=True)
class Ping:
    n: int


@codec.message("test.Pong")
@dataclass(frozen=True, slots=True)
class Pong:
    n: int
    instance: str
    pid: int


@codec.message("test.Crash")
@dataclass(frozen=True, slots=True)
class Crash:
    how: str  # "exception" | "system_exit" | "thread" | "segfault" | "exit" | "hang"


@codec.message("test.Seq")
@dataclass(frozen=True, slots=True)
class Seq:
    n: int


@codec.message("test.Report")
@dataclass(frozen=True, slots=True)
class Report:
    pass


@codec.message("test.Received")
@dataclass(frozen=True, slots=True)
class Received:
    numbers: tuple[int, ...]


@codec.message("test.Stop")
@dataclass(frozen=True, slots=True)
class StopSelf:
    pass


class Probe(Actor):
    """Answers pings, crashes on request in every way a child can die, records Seq numbers."""

    def on_start(self) -> None:
        key = f"{self.ctx.bus.node}/{self.name}"
        with LOCK:
            COUNTERS[key + "/starts"] += 1
            starts = COUNTERS[key + "/starts"]
        if starts <= int(self.ctx.config.get("crash_on_start", 0)):
            raise RuntimeError(f"on_start crash number {starts}")
        if self.ctx.config.get("base_exception_on_start"):
            raise SystemExit("base exception in on_start")

    def on_stop(self) -> None:
        with LOCK:
            COUNTERS[f"{self.ctx.bus.node}/{self.name}/stops"] += 1

    def handle(self, msg: object) -> object:
        if isinstance(msg, Ping):
            return Pong(msg.n + 1, self.instance, os.getpid())
        if isinstance(msg, Seq):
            with LOCK:
                RECEIVED[f"{self.ctx.bus.node}/{self.name}"].append(msg.n)
            return None
        if isinstance(msg, Report):
            with LOCK:
                return Received(tuple(RECEIVED[f"{self.ctx.bus.node}/{self.name}"]))
        if isinstance(msg, StopSelf):
            self.stop()
            return None
        if isinstance(msg, Crash):
            return self._crash(msg.how)
        raise TypeError(f"unexpected {msg!r}")

    def _crash(self, how: str) -> None:
        if how == "exception":
            raise RuntimeError("asked to crash")
        if how == "system_exit":
            raise SystemExit(3)
        if how == "keyboard_interrupt":
            raise KeyboardInterrupt
        if how == "thread":

            def die() -> None:
                raise OSError("background thread failed")

            self.spawn_thread(die, name="worker")
            return
        if how == "hang":
            RELEASE.wait(60)
            return
        if how == "segfault":
            import ctypes

            ctypes.string_at(0)
        if how == "exit":
            os._exit(7)
        raise ValueError(f"unknown crash kind {how!r}")


class Adopter(Actor):
    """Takes connections handed to it: answers ``<pid> <peeked + one line read>`` on each, then closes it."""

    def handle(self, msg: object) -> object:
        from villagemesh.actors.core.transport import ConnectionHandedOff

        if not isinstance(msg, ConnectionHandedOff):
            raise TypeError(f"unexpected {msg!r}")
        sock = socket.socket(fileno=msg.fd)
        sock.settimeout(10)
        data = msg.peeked
        while not data.endswith(b"\n"):
            data += sock.recv(100)
        sock.sendall(b"%d %s" % (os.getpid(), data))
        sock.close()
        return None
