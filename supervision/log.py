"""The node's structured log: JSON lines through structlog, with a fixed supervision vocabulary.

One :class:`EventLog` per node writes every event as one JSON object per line
to a file (the supervision dashboard tails it), and, when stderr is a terminal,
a human form there too. Supervision events are a contract: their names and keys
are fixed, checked on every emit, and documented in ``docs/supervision-log.md``.

Every line carries ``timestamp`` (ISO 8601, UTC), ``level``, ``event`` and
``node``. The supervision events add::

    child_started              supervisor child_id instance isolation restart_count pid
    child_crashed              supervisor child_id instance exc_type exc_message traceback
    child_restarted            supervisor child_id instance restart_count backoff_s
    child_stopped              supervisor child_id instance reason
    restart_intensity_exceeded supervisor child_id intensity period_s restarts
    supervisor_escalated       supervisor parent reason

``instance`` identifies one incarnation of a child (a new one at each restart);
``pid`` is the OS process of a process-isolated child, else null; ``reason`` of
``child_stopped`` is one of ``shutdown`` (its supervisor stopped it), ``normal``
(it stopped by itself), ``timeout`` (it did not stop within its shutdown
timeout) or ``killed`` (brutal kill of a process child).

Other components log their own events through the same log (``peer_discovered``,
``message_delivered``, ...); only the names above are reserved and checked.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import structlog

from villagemesh.errors import ConfigError

__all__ = ["SUPERVISION_EVENTS", "EventLog"]

SUPERVISION_EVENTS: dict[str, frozenset[str]] = {
    "child_started": frozenset({"supervisor", "child_id", "instance", "isolation", "restart_count", "pid"}),
    "child_crashed": frozenset({"supervisor", "child_id", "instance", "exc_type", "exc_message", "traceback"}),
    "child_restarted": frozenset({"supervisor", "child_id", "instance", "restart_count", "backoff_s"}),
    "child_stopped": frozenset({"supervisor", "child_id", "instance", "reason"}),
    "restart_intensity_exceeded": frozenset({"supervisor", "child_id", "intensity", "period_s", "restarts"}),
    "supervisor_escalated": frozenset({"supervisor", "parent", "reason"}),
}
"""The reserved events and exactly the keys each carries (besides the common ones)."""

STOP_REASONS = frozenset({"shutdown", "normal", "timeout", "killed"})

Sink = Callable[[dict[str, Any]], None]


class _LineWriter:
    """structlog's 'logger': writes rendered lines to a text stream under a lock."""

    def __init__(self, stream: TextIO, lock: threading.Lock) -> None:
        self._stream = stream
        self._lock = lock

    def msg(self, line: str) -> None:
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    info = warning = error = debug = critical = msg


class EventLog:
    """A node's event log.

    ``path``: the JSON-lines file (appended; parent folders are made). ``None``
    writes no file. ``human``: also print a readable form on stderr; by default
    only when stderr is a TTY. ``sinks``: callables that also receive every event
    dict (tests and the dashboard's in-process feed use them; they run in the
    emitting thread and must be quick).
    """

    def __init__(
        self,
        node: str,
        path: str | os.PathLike[str] | None = None,
        *,
        human: bool | None = None,
        sinks: Iterable[Sink] = (),
        human_stream: TextIO | None = None,
    ) -> None:
        self.node = node
        self.path = os.fspath(path) if path is not None else None
        self._lock = threading.Lock()
        self._sinks: list[Sink] = list(sinks)
        self._file: TextIO | None = None
        self._json: Any = None
        if self.path is not None:
            parent = os.path.dirname(self.path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()
            self._json = structlog.wrap_logger(
                _LineWriter(self._file, self._lock),
                processors=[structlog.processors.JSONRenderer(sort_keys=False)],
            )
        stream = human_stream if human_stream is not None else sys.stderr
        if human is None:
            human = _isatty(stream)
        self._human: Any = None
        if human:
            self._human = structlog.wrap_logger(
                _LineWriter(stream, self._lock),
                processors=[structlog.dev.ConsoleRenderer(colors=False)],
            )
        self._stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)

    def add_sink(self, sink: Sink) -> None:
        """Also send every later event to ``sink``."""
        self._sinks.append(sink)

    def remove_sink(self, sink: Sink) -> None:
        """Stop sending events to ``sink``."""
        self._sinks.remove(sink)

    def emit(self, event: str, *, level: str = "info", **fields: Any) -> dict[str, Any]:
        """Write one event; supervision events must carry exactly their contract keys."""
        required = SUPERVISION_EVENTS.get(event)
        if required is not None and set(fields) != required:
            missing = sorted(required - set(fields))
            extra = sorted(set(fields) - required)
            raise ConfigError(f"supervision event {event!r}: missing keys {missing}, unexpected keys {extra}")
        if event == "child_stopped" and fields["reason"] not in STOP_REASONS:
            raise ConfigError(f"child_stopped reason must be one of {sorted(STOP_REASONS)}, got {fields['reason']!r}")
        record: dict[str, Any] = {"event": event, "level": level, "node": self.node, **fields}
        record = dict(self._stamp(None, level, record))
        if self._json is not None:
            self._json.msg(**record)
        if self._human is not None:
            self._human.msg(**{k: v for k, v in record.items() if k != "traceback" or v is None})
        for sink in list(self._sinks):
            sink(dict(record))
        return record

    def close(self) -> None:
        """Close the file (later events go only to the sinks and stderr)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
                self._json = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False
