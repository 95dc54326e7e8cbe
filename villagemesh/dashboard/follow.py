"""Following a node's JSON-lines event log as it grows, like ``tail -F``.

A :class:`LogFollower` reads whole lines only: a line the writer has not
finished yet (no newline so far) waits in a buffer until its end arrives. It
notices the two things log files do behind a reader's back::

    rotation    the path now names another file (logrotate's rename + create):
                the old file is read to its end, then the new one from its start
    truncation  the file got shorter than what was read (copytruncate, ``> file``):
                it is read again from its start

Memory stays bounded whatever the file's size: :meth:`LogFollower.poll` reads at
most ``max_bytes`` per call, and a line longer than :data:`MAX_LINE` is skipped
(and counted in ``oversized``) rather than buffered. A line that is not a JSON
object is counted in ``bad_lines`` and skipped: a log copied from another
machine may have a torn last line, and the dashboard must go on.

Polling, not inotify: ``os.stat`` every tenth of a second costs microseconds,
works on every file system and on copied files, and keeps the follower free of
threads (the dashboard calls :meth:`~LogFollower.poll` from its event loop).
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["CHUNK", "MAX_LINE", "LogFollower"]

CHUNK = 64 * 1024
"""Bytes read per system call."""

MAX_LINE = 1024 * 1024
"""The longest line kept (a crash's traceback is a few KiB): longer ones are skipped, not buffered."""


class LogFollower:
    """Reads the JSON objects a growing, possibly rotated or truncated, log file holds.

    ``path`` may not exist yet (a node that has not started): :meth:`poll` then
    returns nothing until it does. ``from_start=False`` skips what the file
    already holds (only later lines are returned).
    """

    def __init__(self, path: str | os.PathLike[str], *, from_start: bool = True) -> None:
        self.path = os.fspath(path)
        self._from_start = from_start
        self._file: Any = None
        self._ino: tuple[int, int] | None = None
        self._offset = 0
        self._partial = bytearray()
        self._skipping = False
        self.bad_lines = 0
        """Lines that were not a JSON object (skipped)."""
        self.oversized = 0
        """Lines longer than :data:`MAX_LINE` (skipped)."""
        self.rotations = 0
        self.truncations = 0

    def close(self) -> None:
        """Close the open file (a later :meth:`poll` opens it again, from where it was)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> LogFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def poll(self, max_bytes: int = 4 * 1024 * 1024) -> list[dict[str, Any]]:
        """The records whose lines were completed since the last call (at most ``max_bytes`` read)."""
        records: list[dict[str, Any]] = []
        if self._file is None and not self._open():
            return records
        budget = max_bytes
        while budget > 0:
            chunk = self._file.read(min(CHUNK, budget))
            if chunk:
                budget -= len(chunk)
                self._offset += len(chunk)
                self._feed(chunk, records)
                continue
            # At the end of what we have open: has the path moved on, or the file shrunk?
            moved = self._moved()
            if moved == "rotated":
                self.rotations += 1
                self._reopen(from_start=True)
                continue
            if moved == "truncated":
                self.truncations += 1
                self._reopen(from_start=True)
                continue
            break
        return records

    # -- files ----------------------------------------------------------------------------------

    def _open(self) -> bool:
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 - kept open across polls, closed in close()
        except FileNotFoundError:
            return False
        st = os.fstat(handle.fileno())
        ino = (st.st_dev, st.st_ino)
        if ino != self._ino:
            # A file we have not read from yet: from its start (or its end, once, if asked).
            self._offset = 0 if self._from_start or self._ino is not None else st.st_size
            self._partial.clear()
            self._skipping = False
        self._ino = ino
        handle.seek(self._offset)
        self._file = handle
        return True

    def _reopen(self, *, from_start: bool) -> None:
        self.close()
        if from_start:
            self._offset = 0
            self._partial.clear()
            self._skipping = False
            self._ino = None
            self._from_start = True
        self._open()

    def _moved(self) -> str | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None  # rotated away and not yet re-created: keep what we have open
        if (st.st_dev, st.st_ino) != self._ino:
            return "rotated"
        if st.st_size < self._offset:
            return "truncated"
        return None

    # -- lines ----------------------------------------------------------------------------------

    def _feed(self, chunk: bytes, records: list[dict[str, Any]]) -> None:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                rest = chunk[start:]
                if self._skipping:
                    return
                if len(self._partial) + len(rest) > MAX_LINE:
                    self._partial.clear()
                    self._skipping = True
                    self.oversized += 1
                    return
                self._partial += rest
                return
            piece = chunk[start:end]
            start = end + 1
            if self._skipping:
                self._skipping = False
                continue
            if self._partial:
                if len(self._partial) + len(piece) > MAX_LINE:
                    self.oversized += 1
                    self._partial.clear()
                    continue
                self._partial += piece
                line = bytes(self._partial)
                self._partial.clear()
            else:  # a piece of one chunk: never longer than MAX_LINE (CHUNK is smaller)
                line = piece
            self._parse(line, records)

    def _parse(self, line: bytes, records: list[dict[str, Any]]) -> None:
        if not line.strip():
            return
        try:
            record = json.loads(line)
        except ValueError:
            self.bad_lines += 1
            return
        if type(record) is not dict:
            self.bad_lines += 1
            return
        records.append(record)
