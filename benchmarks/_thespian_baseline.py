"""Thespian's multiprocTCPBase doing what restart_latency.py measures: kill -9 a child, time to its answer again.

    from _thespian_baseline import ThespianRestarts
    with ThespianRestarts() as thespian:
        samples_ms = [thespian.kill_once() for _ in range(60)]

A ``Parent`` actor creates a ``Child`` actor (its own OS process) and, when
Thespian tells it ``ChildActorExited``, creates a new one and asks it for its
pid at once. The benchmark asks the parent for "a child pid other than the one
I just killed"; the parent answers as soon as a new child has answered it. So
one sample is: ``kill -9`` → Thespian notices the death (the parent process
gets SIGCHLD) → the parent creates a new child process → the new child answers
→ the answer reaches the benchmark. No request is ever sent into the dead
child (Thespian would lose it), and no re-ask timer quantizes the figure: the
same semantics as villagemesh's process isolation, where a request made right
after the kill waits for the restarted child.

Robustness: a fresh admin on a free loopback port per instance (never joining
another run's system), every ask bounded by :data:`ASK_TIMEOUT`, and the
system shut down by ``close()`` (its actor processes with it). The system stays
up between calls, so a benchmark can alternate blocks of Thespian kills with
its own while both runtimes are alive.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

from thespian.actors import Actor, ActorExitRequest, ActorSystem, ChildActorExited

ASK_TIMEOUT = 10.0
"""Seconds any single ask may take before the benchmark gives up (Thespian takes milliseconds)."""


class Child(Actor):
    """Answers "pid" with its process id."""

    def receiveMessage(self, message: Any, sender: Any) -> None:  # Thespian names it
        if message == "pid":
            self.send(sender, os.getpid())


class Parent(Actor):
    """Keeps one Child alive, recreating it on ChildActorExited; answers ("new_pid", old) with a new child's pid."""

    def __init__(self) -> None:
        super().__init__()
        self.child: Any = None
        self.child_pid: int | None = None
        self.waiter: Any = None
        self.old_pid = 0

    def receiveMessage(self, message: Any, sender: Any) -> None:  # Thespian names it
        if isinstance(message, ChildActorExited):
            if message.childAddress == self.child:
                self._spawn()
        elif isinstance(message, ActorExitRequest):
            return
        elif isinstance(message, tuple) and message[:1] == ("new_pid",):
            self.waiter, self.old_pid = sender, message[1]
            if self.child is None:
                self._spawn()
            self._answer()
        elif isinstance(message, int):  # the current child's pid, asked for when it was created
            self.child_pid = message
            self._answer()

    def _spawn(self) -> None:
        self.child = self.createActor(Child)
        self.child_pid = None
        self.send(self.child, "pid")

    def _answer(self) -> None:
        if self.waiter is not None and self.child_pid is not None and self.child_pid != self.old_pid:
            self.send(self.waiter, self.child_pid)
            self.waiter = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ThespianRestarts:
    """One Thespian system with a Parent keeping one Child; :meth:`kill_once` times one kill → answer."""

    def __init__(self) -> None:
        self.system = ActorSystem("multiprocTCPBase", {"Admin Port": _free_port()})
        try:
            self.parent = self.system.createActor(Parent)
            self.pid = self._new_pid(0)
        except BaseException:
            self.system.shutdown()
            raise

    def _new_pid(self, old: int) -> int:
        answer = self.system.ask(self.parent, ("new_pid", old), ASK_TIMEOUT)
        if not isinstance(answer, int):
            raise TimeoutError(f"Thespian answered {answer!r} instead of a new child's pid within {ASK_TIMEOUT} s")
        return answer

    def kill_once(self) -> float:
        """``kill -9`` of the current child → the recreated child's answer, in ms."""
        t0 = time.perf_counter()
        os.kill(self.pid, signal.SIGKILL)
        self.pid = self._new_pid(self.pid)
        return (time.perf_counter() - t0) * 1e3

    def close(self) -> None:
        self.system.shutdown()

    def __enter__(self) -> ThespianRestarts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    import statistics

    with ThespianRestarts() as thespian:
        ms = sorted(thespian.kill_once() for _ in range(50))
    print(f"Thespian kill -9 -> answer: p50 {statistics.median(ms):.2f} ms, p99 {ms[int(0.99 * (len(ms) - 1))]:.2f} ms")
