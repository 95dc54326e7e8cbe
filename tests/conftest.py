"""Shared fixtures: a node's runtime pieces (bus, timer thread, event log) and event waiting.

Tests wait on events, never on sleeps: :class:`Recorder` collects every log event
and :meth:`Recorder.wait_for` blocks until a matching one arrives (or fails the
test after a generous bound that only a real hang reaches).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

WAIT = 10.0
"""Upper bound for any wait in a test: reached only when something hangs."""


class Recorder:
    """Collects event dicts (a log sink) and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def matching(self, event: str, **match: Any) -> list[dict[str, Any]]:
        """Every recorded event named ``event`` whose fields equal ``match``."""
        with self._cond:
            return [e for e in self.events if e["event"] == event and all(e.get(k) == v for k, v in match.items())]

    def wait_for(self, event: str, count: int = 1, timeout: float = WAIT, **match: Any) -> list[dict[str, Any]]:
        """Block until ``count`` matching events were recorded; fail the test after ``timeout``."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.matching(event, **match)) >= count, timeout)
        if not ok:
            names = [e["event"] for e in self.events][-20:]
            pytest.fail(f"timed out waiting for {count} x {event} {match}; last events: {names}")
        return self.matching(event, **match)

    def names(self) -> list[str]:
        """The event names in order."""
        with self._cond:
            return [e["event"] for e in self.events]


_node_ids = itertools.count()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def runtime(recorder: Recorder, tmp_path: Any) -> Iterator[Any]:
    """A node's runtime pieces, torn down after the test: ``env`` for supervisors."""
    from villagemesh.actors.core.base import Scheduler
    from villagemesh.actors.core.bus import Bus
    from villagemesh.supervision.log import EventLog
    from villagemesh.supervision.supervisor import Environment

    bus = Bus(f"test{next(_node_ids)}")
    scheduler = Scheduler()
    log = EventLog(bus.node, tmp_path / "node.log.jsonl", human=False, sinks=[recorder])
    env = Environment(bus=bus, log=log, scheduler=scheduler)
    yield env
    import pykka

    from villagemesh.supervision.supervisor import Supervisor

    # Supervisors first, in the order they registered (a top-level one before those it started):
    # each stops its children in reverse order (OTP), so none is restarted under a stop_all that
    # stopped it from outside. Then whatever is left.
    for ref in pykka.ActorRegistry.get_by_class(Supervisor):
        ref.stop(block=True, timeout=10)  # one stopped meanwhile by its parent: returns at once
    pykka.ActorRegistry.stop_all(block=True, timeout=5)
    bus.close()
    scheduler.close()
    log.close()
