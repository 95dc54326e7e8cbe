"""What the node-level tests share: fast node settings, a payload inbox, the event-log reader, free ports.

Whole nodes are tested from the outside, through the public API
(:func:`villagemesh.create_network`) and the event log every node writes to
``data_dir/events.jsonl``. Waiting is on conditions (a payload count, an event
in the log), bounded by generous limits that only a hang reaches.

The same helpers serve the subprocess runner (:mod:`.node_runner`), so a node
in a child process is configured exactly like one in the test process.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from villagemesh.node import free_port as free_port  # the node's own, re-exported for the tests

FAST: dict[str, Any] = {
    "discovery_interval": 0.3,
    "discovery_timeout": 0.5,
    "ack_timeout": 1.0,
    "max_attempts": 60,
    "backoff_base": 0.05,
    "backoff_max": 0.5,
}
"""Node settings for tests: quick discovery rounds, quick retries, and enough attempts (about 30 s of
retrying) that a peer down for a restart is waited for rather than given up on."""

PATIENCE = 45.0
"""Seconds a test waits for a network-wide condition: reached only when something hangs."""


def make_node(data_dir: Path, name: str, *, bootstrap: Iterable[str] = (), **settings: Any) -> Any:
    """A node (not started) on 127.0.0.1 with the :data:`FAST` settings, ``settings`` overriding them."""
    from villagemesh import create_network

    return create_network(
        settings.pop("mode", "hybrid"),
        name=name,
        data_dir=data_dir,
        host="127.0.0.1",
        bootstrap=tuple(bootstrap),
        **{**FAST, **settings},
    )


@contextmanager
def running(nodes: Iterable[Any]) -> Iterator[list[Any]]:
    """Start every node in order; stop them all (reverse order) however the block ends."""
    started: list[Any] = []
    try:
        for node in nodes:
            started.append(node.start())
        yield started
    finally:
        for node in reversed(started):
            node.stop()


class Inbox:
    """A subscriber that counts payloads; tests wait until enough distinct ones arrived."""

    def __init__(self) -> None:
        self.counts: Counter[bytes] = Counter()
        self.senders: dict[bytes, str] = {}
        self._cond = threading.Condition()

    def __call__(self, message: Any) -> None:
        with self._cond:
            self.counts[message.payload] += 1
            self.senders[message.payload] = message.sender
            self._cond.notify_all()

    def wait_for_distinct(self, count: int, timeout: float = PATIENCE) -> bool:
        """True once ``count`` distinct payloads arrived; False after ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.counts) >= count, timeout)

    def duplicates(self) -> dict[bytes, int]:
        """Payloads seen more than once, with their counts."""
        with self._cond:
            return {p: n for p, n in self.counts.items() if n > 1}

    def distinct(self) -> set[bytes]:
        with self._cond:
            return set(self.counts)


class EventFile:
    """Reads a node's ``events.jsonl`` (the log the node writes) and waits for events in it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def events(self) -> list[dict[str, Any]]:
        """Every complete line so far, parsed (a line still being written is left for later)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True):
            if line.endswith("\n"):
                out.append(json.loads(line))
        return out

    def matching(self, event: str, **match: Any) -> list[dict[str, Any]]:
        """Every event named ``event`` whose fields equal ``match``."""
        return [e for e in self.events() if e["event"] == event and all(e.get(k) == v for k, v in match.items())]

    def wait_for(self, event: str, count: int = 1, timeout: float = PATIENCE, **match: Any) -> list[dict[str, Any]]:
        """The matching events once there are ``count``; AssertionError naming the last events after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.matching(event, **match)
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                last = [e["event"] for e in self.events()][-20:]
                raise AssertionError(f"{self.path}: no {count} x {event} {match} in {timeout} s; last: {last}")
            threading.Event().wait(0.05)  # the file has no change notification: poll it


def wait_until(predicate: Any, timeout: float = PATIENCE, every: float = 0.05) -> bool:
    """Poll ``predicate()`` until it is true (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        threading.Event().wait(every)
    return True
