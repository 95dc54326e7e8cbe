"""The peer registry's SQLite file: every peer record, surviving restarts of the registry and the node.

Schema (version 1, ``PRAGMA user_version``)::

    peers(peer_id      TEXT PRIMARY KEY,
          addresses    TEXT NOT NULL,   JSON {"transport": ["address", ...]}
          capabilities TEXT,            JSON Capabilities.to_json(), or NULL
          public_key   BLOB,
          last_seen    REAL NOT NULL,   indexed: expiry scans it
          trust        REAL NOT NULL,
          latency_ms   REAL,
          source       TEXT)

The store is dumb on purpose: :meth:`PeerStore.upsert` writes the record it is
given; merging a sighting with what is known is :func:`.state.merge`'s job,
done by the actor before it writes.

Durability (see :mod:`.db`): WAL with ``synchronous=NORMAL``. Every write is
committed before the method returns, so a killed process loses nothing; a power
cut may lose the last few sightings, which is harmless here: peers re-announce
every heartbeat, and trust changes are rare and small.

One connection, used only from the thread that opened the store (the
registry actor's, in ``on_start``). Any SQLite failure, and a row that does
not decode to a valid record (a corrupted or hand-edited file), is
:class:`~villagemesh.errors.StorageError` naming the file.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from villagemesh.actors.core.storage import open_database, transaction, translate
from villagemesh.errors import ConfigError, ProtocolError, StorageError
from villagemesh.protocols.discovery import Capabilities

from .state import PeerRecord

__all__ = ["SCHEMA_VERSION", "PeerStore"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE peers (
    peer_id      TEXT PRIMARY KEY,
    addresses    TEXT NOT NULL,
    capabilities TEXT,
    public_key   BLOB,
    last_seen    REAL NOT NULL,
    trust        REAL NOT NULL,
    latency_ms   REAL,
    source       TEXT
);
CREATE INDEX peers_last_seen ON peers (last_seen)
"""

_COLUMNS = "peer_id, addresses, capabilities, public_key, last_seen, trust, latency_ms, source"


class PeerStore:
    """Peer records in an SQLite file (WAL). Open it in the thread that will use it."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = open_database(
            self.path, schema=_SCHEMA, version=SCHEMA_VERSION, synchronous=synchronous
        )

    def __repr__(self) -> str:
        return f"PeerStore({str(self.path)!r})"

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError(f"{self.path}: the peer store is closed")
        return self._conn

    # -- writes --------------------------------------------------------------------------------

    def upsert(self, rec: PeerRecord) -> None:
        """Insert or replace the record of ``rec.peer_id``; committed on return."""
        self.upsert_many([rec])

    def upsert_many(self, records: list[PeerRecord]) -> None:
        """Insert or replace several records in one transaction; committed on return."""
        rows = [_to_row(r) for r in records]
        with translate(self.path, f"writing {len(rows)} peer record(s)"), transaction(self._db) as db:
            db.executemany(
                f"INSERT INTO peers ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (peer_id) DO UPDATE SET"
                " addresses = excluded.addresses, capabilities = excluded.capabilities,"
                " public_key = excluded.public_key, last_seen = excluded.last_seen, trust = excluded.trust,"
                " latency_ms = excluded.latency_ms, source = excluded.source",
                rows,
            )

    def remove(self, peer_id: str) -> bool:
        """Forget ``peer_id``; True if it was known."""
        with translate(self.path, f"removing peer {peer_id!r}"):
            return self._db.execute("DELETE FROM peers WHERE peer_id = ?", (peer_id,)).rowcount > 0

    def expire(self, now: float, max_age: float) -> list[str]:
        """Forget every peer not seen for more than ``max_age`` seconds; their ids, sorted.

        The same rule as :func:`.state.expired`.
        """
        with translate(self.path, "expiring stale peers"), transaction(self._db) as db:
            cutoff = now - max_age
            ids = [row[0] for row in db.execute("SELECT peer_id FROM peers WHERE last_seen < ?", (cutoff,))]
            db.execute("DELETE FROM peers WHERE last_seen < ?", (cutoff,))
        return sorted(ids)

    # -- reads ---------------------------------------------------------------------------------

    def get(self, peer_id: str) -> PeerRecord | None:
        """The record of ``peer_id``, or None."""
        with translate(self.path, f"reading peer {peer_id!r}"):
            row = self._db.execute(f"SELECT {_COLUMNS} FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()
        return None if row is None else self._from_row(row)

    def all(self) -> list[PeerRecord]:
        """Every record, by peer id."""
        with translate(self.path, "reading all peers"):
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM peers ORDER BY peer_id").fetchall()
        return [self._from_row(row) for row in rows]

    def __len__(self) -> int:
        with translate(self.path, "counting peers"):
            return int(self._db.execute("SELECT count(*) FROM peers").fetchone()[0])

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file (idempotent). Everything written is already committed."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with translate(self.path, "closing the peer store"):
                conn.close()

    def __enter__(self) -> PeerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _from_row(self, row: tuple[Any, ...]) -> PeerRecord:
        try:
            return _from_row(row)
        except (ValueError, TypeError, KeyError, ConfigError, ProtocolError) as exc:
            raise StorageError(f"{self.path}: peer {row[0]!r} has an unreadable row: {exc}") from exc


def _to_row(rec: PeerRecord) -> tuple[Any, ...]:
    caps = None if rec.capabilities is None else json.dumps(rec.capabilities.to_json(), sort_keys=True)
    addresses = json.dumps({t: list(a) for t, a in rec.addresses}, sort_keys=True)
    return (rec.peer_id, addresses, caps, rec.public_key, rec.last_seen, rec.trust, rec.latency_ms, rec.source)


def _from_row(row: tuple[Any, ...]) -> PeerRecord:
    peer_id, addresses, caps, public_key, last_seen, trust, latency_ms, source = row
    grouped = json.loads(addresses)
    if not isinstance(grouped, dict) or not all(isinstance(a, list) for a in grouped.values()):
        raise ValueError(f"addresses is not a JSON object of lists: {addresses!r}")
    return PeerRecord(
        peer_id=peer_id,
        addresses=tuple((transport, tuple(a)) for transport, a in grouped.items()),
        capabilities=None if caps is None else Capabilities.from_json(json.loads(caps)),
        public_key=public_key,
        last_seen=last_seen,
        trust=trust,
        latency_ms=latency_ms,
        source=source,
    )
