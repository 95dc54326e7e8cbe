"""The relay's replay tags on disk, so that a restarted mix does not accept a packet it has already forwarded.

One table in ``betanet.sqlite3`` (opened by :mod:`villagemesh.actors.core.storage`)::

    tags(epoch INTEGER, tag BLOB, PRIMARY KEY (epoch, tag)) WITHOUT ROWID

A tag is committed before its packet goes on (or is delivered), so after a
``kill -9`` every packet that left this mix is refused if it comes again. Only
the epochs the mix accepts are kept (:meth:`ReplayStore.prune` at each epoch
boundary), so the file is bounded like the caches it mirrors.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from villagemesh.actors.core.storage import open_database, translate
from villagemesh.errors import StorageError
from villagemesh.protocols.sphinx import ReplayCache

__all__ = ["SCHEMA_VERSION", "ReplayStore"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE tags (
    epoch INTEGER NOT NULL,
    tag   BLOB NOT NULL CHECK (length(tag) = 32),
    PRIMARY KEY (epoch, tag)
) WITHOUT ROWID
"""


class ReplayStore:
    """Replay tags per epoch in one SQLite file; open it in the relay's thread."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = open_database(
            self.path, schema=_SCHEMA, version=SCHEMA_VERSION, synchronous=synchronous
        )

    def load(self, epochs: Iterable[int], capacity: int) -> dict[int, ReplayCache]:
        """A replay cache for each of ``epochs``, holding the tags stored for it."""
        caches: dict[int, ReplayCache] = {}
        with translate(self.path, "loading replay tags"):
            for epoch in epochs:
                cache = caches[epoch] = ReplayCache(capacity)
                for (tag,) in self._db.execute("SELECT tag FROM tags WHERE epoch = ?", (epoch,)):
                    cache.add(bytes(tag))
        return caches

    def add(self, epoch: int, tag: bytes) -> None:
        """Store ``tag`` for ``epoch``; committed on return."""
        with translate(self.path, f"storing a replay tag of epoch {epoch}"):
            self._db.execute("INSERT OR IGNORE INTO tags (epoch, tag) VALUES (?, ?)", (epoch, tag))

    def prune(self, keep: Iterable[int]) -> int:
        """Forget every epoch but ``keep``; how many tags went."""
        kept = sorted(set(keep))
        marks = ", ".join("?" * len(kept))
        with translate(self.path, "pruning replay tags"):
            return self._db.execute(f"DELETE FROM tags WHERE epoch NOT IN ({marks})", kept).rowcount

    def count(self) -> int:
        with translate(self.path, "counting replay tags"):
            return int(self._db.execute("SELECT count(*) FROM tags").fetchone()[0])

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError(f"{self.path}: the replay store is closed")
        return self._conn

    def close(self) -> None:
        """Close the file (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with translate(self.path, "closing the replay store"):
                conn.close()

    def __repr__(self) -> str:
        return f"ReplayStore({str(self.path)!r})"

