"""Thespian's multiprocTCPBase doing what restart_latency.py measures: kill -9 a child, time to its answer again.

A parent actor creates a child actor (its own OS process), and recreates it when
Thespian tells it ``ChildActorExited``. The benchmark asks the child for its
pid, kills that process with SIGKILL, and times from the kill until a request
routed through the parent is answered by the new child. Requests that reach
the dead child are lost in Thespian (villagemesh holds them for the new child
instead), so the benchmark re-asks every 5 ms until the new child answers.
"""

from __future__ import annotations

import os
import signal
import time

from thespian.actors import Actor, ActorExitRequest, ActorSystem, ChildActorExited

RESEND = 0.005
"""Seconds between re-asks while the killed child is being replaced (small, so it barely adds)."""


class Child(Actor):
    def receiveMessage(self, message, sender):  # noqa: N802 - Thespian's API
        if message == "pid":
            self.send(sender, os.getpid())


class Parent(Actor):
    def __init__(self) -> None:
        super().__init__()
        self.child = None

    def receiveMessage(self, message, sender):  # noqa: N802 - Thespian's API
        if isinstance(message, ChildActorExited):
            self.child = self.createActor(Child)
        elif isinstance(message, ActorExitRequest):
            return
        elif message == "pid":
            if self.child is None:
                self.child = self.createActor(Child)
            self.asker = sender
            self.send(self.child, "pid")
        elif isinstance(message, int):
            self.send(self.asker, message)


def thespian_kill_restart(n: int, *, port: int = 19501) -> list[float]:
    """``n`` samples (ms) of kill -9 → the recreated child answering, with Thespian multiprocTCPBase."""
    system = ActorSystem("multiprocTCPBase", {"Admin Port": port})
    try:
        parent = system.createActor(Parent)
        pid = system.ask(parent, "pid", 10)
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while True:
                # A request routed to the dead child before Thespian noticed is lost
                # (no answer ever comes), so ask again every RESEND seconds, as a
                # client of Thespian has to; a new pid answering ends the sample.
                answer = system.ask(parent, "pid", RESEND)
                if isinstance(answer, int) and answer != pid:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("Thespian did not bring the child back within 30 s")
            samples.append((time.perf_counter() - t0) * 1e3)
            pid = answer
        return samples
    finally:
        system.shutdown()
