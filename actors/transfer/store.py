"""The transfer actor's file, ``data_dir/transfers.sqlite3`` (opened by :mod:`villagemesh.actors.core.storage`)::

    outgoing(transfer_id, peer_id, path, size, chunk_size, digest, kind, name, spooled,
             acked, state, detail, algorithm)   one row per transfer this node sends
    incoming(transfer_id, peer_id, size, chunk_size, digest, kind, name, partial, final,
             state, detail, algorithm)          one row per transfer this node accepted
    chunks(transfer_id, idx)                    every chunk of an incoming transfer committed

Schema version 2 added ``algorithm`` (the whole digest's
:class:`~villagemesh.protocols.transfer.DigestAlgorithm`); a version-1 file is
migrated on open, its transfers keeping BLAKE2b-256, the only digest version 1 had.

Commit points (what survives a ``kill -9``):

- a sender commits its row before the offer leaves, and ``acked`` (the receiver's
  committed prefix) as acks arrive; after a restart it offers again and the
  receiver's answer says where to go on;
- a receiver writes a chunk into the partial file (``pwrite``, in the page cache,
  which a killed process does not lose) and then commits its ``chunks`` row, in one
  transaction per batch; only then is the chunk acknowledged. After a restart the
  rows are the committed chunks: a chunk written but not committed is written again;
- a refused offer is never stored (nothing is written for it).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from villagemesh.actors.core.storage import open_database, transaction, translate
from villagemesh.errors import StorageError
from villagemesh.protocols.transfer import DigestAlgorithm, Offer

__all__ = ["SCHEMA_VERSION", "IncomingRow", "OutgoingRow", "TransferStore"]

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE outgoing (
    transfer_id BLOB PRIMARY KEY,
    peer_id     TEXT NOT NULL,
    path        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    chunk_size  INTEGER NOT NULL,
    digest      BLOB NOT NULL,
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    spooled     INTEGER NOT NULL,
    acked       INTEGER NOT NULL DEFAULT 0,
    state       TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT '',
    algorithm   INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE incoming (
    transfer_id BLOB PRIMARY KEY,
    peer_id     TEXT NOT NULL,
    size        INTEGER NOT NULL,
    chunk_size  INTEGER NOT NULL,
    digest      BLOB NOT NULL,
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    partial     TEXT NOT NULL,
    final       TEXT NOT NULL,
    state       TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT '',
    algorithm   INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE chunks (
    transfer_id BLOB NOT NULL,
    idx         INTEGER NOT NULL,
    PRIMARY KEY (transfer_id, idx)
) WITHOUT ROWID
"""


@dataclass(frozen=True)
class OutgoingRow:
    offer: Offer
    peer_id: str
    path: str
    spooled: bool
    acked: int
    state: str
    detail: str


@dataclass(frozen=True)
class IncomingRow:
    offer: Offer
    peer_id: str
    partial: str
    final: str
    state: str
    detail: str
    committed: frozenset[int]


_MIGRATIONS = {
    1: "ALTER TABLE outgoing ADD COLUMN algorithm INTEGER NOT NULL DEFAULT 1;"
    " ALTER TABLE incoming ADD COLUMN algorithm INTEGER NOT NULL DEFAULT 1"
}
"""Version n -> n + 1 (:func:`~villagemesh.actors.core.storage.open_database` runs them in order)."""


def _offer(row: tuple[Any, ...]) -> Offer:
    transfer_id, size, chunk_size, digest, kind, name, algorithm = row
    return Offer(bytes(transfer_id), size, chunk_size, bytes(digest), kind, name, DigestAlgorithm(algorithm))


class TransferStore:
    """Outgoing and incoming transfers in one SQLite file; open it in the transfer actor's thread."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = open_database(
            self.path, schema=_SCHEMA, version=SCHEMA_VERSION, synchronous=synchronous, migrations=_MIGRATIONS
        )

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError(f"{self.path}: the transfer store is closed")
        return self._conn

    def close(self) -> None:
        """Close the file (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with translate(self.path, "closing the transfer store"):
                conn.close()

    def __repr__(self) -> str:
        return f"TransferStore({str(self.path)!r})"

    # -- outgoing ----------------------------------------------------------------------------------

    def add_outgoing(self, offer: Offer, peer_id: str, path: str, spooled: bool) -> None:
        """Store a new outgoing transfer (committed on return, before its offer leaves)."""
        with translate(self.path, f"storing outgoing transfer {offer.transfer_id.hex()}"):
            self._db.execute(
                "INSERT INTO outgoing (transfer_id, peer_id, path, size, chunk_size, digest, kind, name, spooled,"
                " algorithm, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'offered')",
                (
                    offer.transfer_id,
                    peer_id,
                    path,
                    offer.size,
                    offer.chunk_size,
                    offer.digest,
                    offer.kind,
                    offer.name,
                    int(spooled),
                    int(offer.algorithm),
                ),
            )

    def set_outgoing(self, updates: Iterable[tuple[bytes, int, str, str]]) -> None:
        """``(transfer_id, acked, state, detail)`` for several outgoing transfers, in one commit."""
        rows = [(acked, state, detail, tid) for tid, acked, state, detail in updates]
        if not rows:
            return
        with translate(self.path, f"updating {len(rows)} outgoing transfer(s)"), transaction(self._db) as db:
            db.executemany("UPDATE outgoing SET acked = ?, state = ?, detail = ? WHERE transfer_id = ?", rows)

    def outgoing(self) -> list[OutgoingRow]:
        """Every outgoing transfer, oldest first."""
        with translate(self.path, "reading outgoing transfers"):
            rows = self._db.execute(
                "SELECT transfer_id, size, chunk_size, digest, kind, name, algorithm, peer_id, path, spooled, acked,"
                " state, detail FROM outgoing ORDER BY rowid"
            ).fetchall()
        return [OutgoingRow(_offer(r[:7]), r[7], r[8], bool(r[9]), r[10], r[11], r[12]) for r in rows]

    # -- incoming ----------------------------------------------------------------------------------

    def add_incoming(self, offer: Offer, peer_id: str, partial: str, final: str) -> None:
        """Store an accepted offer (committed on return, before its Accept leaves)."""
        with translate(self.path, f"storing incoming transfer {offer.transfer_id.hex()}"):
            self._db.execute(
                "INSERT INTO incoming (transfer_id, peer_id, size, chunk_size, digest, kind, name, partial, final,"
                " algorithm, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'receiving')",
                (
                    offer.transfer_id,
                    peer_id,
                    offer.size,
                    offer.chunk_size,
                    offer.digest,
                    offer.kind,
                    offer.name,
                    partial,
                    final,
                    int(offer.algorithm),
                ),
            )

    def commit_chunks(self, chunks: Iterable[tuple[bytes, int]], ends: Iterable[tuple[bytes, str, str]] = ()) -> None:
        """Record ``(transfer_id, index)`` committed and ``(transfer_id, state, detail)`` ends, in one commit."""
        chunk_rows, end_rows = list(chunks), [(state, detail, tid) for tid, state, detail in ends]
        if not chunk_rows and not end_rows:
            return
        with translate(self.path, f"committing {len(chunk_rows)} chunk(s)"), transaction(self._db) as db:
            db.executemany("INSERT OR IGNORE INTO chunks (transfer_id, idx) VALUES (?, ?)", chunk_rows)
            db.executemany("UPDATE incoming SET state = ?, detail = ? WHERE transfer_id = ?", end_rows)
            for _, _, tid in end_rows:
                db.execute("DELETE FROM chunks WHERE transfer_id = ?", (tid,))

    def incoming(self) -> list[IncomingRow]:
        """Every incoming transfer with its committed chunks, oldest first."""
        with translate(self.path, "reading incoming transfers"):
            rows = self._db.execute(
                "SELECT transfer_id, size, chunk_size, digest, kind, name, algorithm, peer_id, partial, final, state,"
                " detail FROM incoming ORDER BY rowid"
            ).fetchall()
            committed: dict[bytes, set[int]] = {}
            for tid, idx in self._db.execute("SELECT transfer_id, idx FROM chunks"):
                committed.setdefault(bytes(tid), set()).add(idx)
        return [
            IncomingRow(_offer(r[:7]), r[7], r[8], r[9], r[10], r[11], frozenset(committed.get(bytes(r[0]), ())))
            for r in rows
        ]
