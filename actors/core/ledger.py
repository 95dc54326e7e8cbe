"""The messages file: the outbox and inbox tables, and the :class:`Inbox`, the one store two actors share.

Ownership
=========
The file belongs to the **delivery retrier**: it keeps the ``outbox`` table
(through :class:`villagemesh.actors.retrier.store.Outbox`, its private store)
and writes every arrival into the ``inbox`` (:meth:`Inbox.accept`, before it
acks) and forgets old ones (:meth:`Inbox.expire`). The **application gateway**
is the one other writer, and only through this documented interface: it counts
a dispatch (:meth:`Inbox.begin_dispatch`) just before the handlers run and
marks the message handled (:meth:`Inbox.mark_handled`) straight after, on its
own connection in its own thread, because those two commits must bracket the
handlers with nothing in between (a bus round trip to the retrier there would
widen the window in which a crash repeats a handler). Nobody else opens the
file; :class:`villagemesh.Node` creates it first (:func:`prepare`).

Both tables live in schema version 2, so a node may keep them in one file or two.
See :mod:`villagemesh.actors.core.storage` for how files are opened (WAL,
``synchronous``, schema version, one connection per thread, StorageError)::

    outbox(message_id BLOB PRIMARY KEY,    16 bytes, the envelope id
           recipient TEXT, priority INTEGER, payload BLOB (the encoded envelope),
           created_at REAL, expires_at REAL,
           attempts INTEGER, next_attempt_at REAL, last_error TEXT,
           failed TEXT)                     JSON list: transports failed this round
    inbox (message_id BLOB PRIMARY KEY, expires_at REAL,
           payload BLOB,                    NULL once handled
           handled INTEGER,                 0 or 1
           dispatches INTEGER)              dispatches begun (0 until the first)

Version 1 (before ``dispatches``) was never released; such a file is refused.

Exactly once, across crashes of either node
===========================================

A message is *handled* when every handler subscribed to it has returned and
the mark saying so is committed. Commit points (each one SQLite transaction,
durable when the call returns; with ``synchronous=NORMAL`` against process
death, with ``FULL`` against power loss too), in order, and what a crash just
before each means::

    sender                                 receiver
    S1 Outbox.put            (commit)
    S2 Outbox.apply(Send)    (commit)
    S3 transport send  ───── envelope ───► R1 Inbox.accept          (commit)
                                           R2 send ack (again for a duplicate)
    S4 ack arrives    ◄──────── ack ────── R3 Inbox.begin_dispatch  (commit)
    S5 Outbox.apply(Delivered) (commit)    R4 the handlers run and return
                                           R5 Inbox.mark_handled    (commit)

For a new message the retrier lets the state decide its first ``Send`` before
storing it, and :meth:`Outbox.put` stores the row with that attempt already
counted: S1 and S2 are one commit (the windows below stay true, S1–S2 is
empty). Later attempts commit their own S2.

R3 and R5 are committed by the application gateway itself, in its own thread,
on its own connection: R3 just before it calls the handlers, R5 straight after
the last one returns, before it does anything else. The node's gateway commits
R5 together with the *outcome report* to the sender (an outbox row, like any
message the retrier sends: :meth:`Inbox.mark_handled_reporting`), so a kill
after R5 never loses the report: the restarted retrier replays it.

* crash before S1: ``send`` never returned; the caller did not hand it over.
* S1–S2: the row is there with attempts 0; after restart it is sent.
* S2–S3: attempts counted but nothing sent (one attempt of the budget spent);
  it is retried at the stored deadline.
* S3–S5 (sender dies, receiver may have it): the row is still there, so it is
  sent again after the restart; the receiver's R1 answers *duplicate* and
  re-acks, and the handler never sees it again. The ack deletes the row.
* receiver dies before R1: no ack went out; the sender retries; R1 accepts
  the retry as the first copy.
* R1–R3: the message is accepted (payload stored), no handler has seen it.
  After restart :meth:`Inbox.unhandled` lists it and the node dispatches it
  from the stored payload, as a first dispatch; a re-sent copy meanwhile is a
  duplicate (re-acked, not dispatched). Because the receiver acks only after
  R1, an acked message is always durable at the receiver.
* R3–R5: the handlers may have run, wholly or in part (the process died while
  one ran, or in the instant between the last one's return and the commit).
  After restart the message is dispatched again, and R3 counts a second
  dispatch, so the handlers get it with ``redelivered`` set. This is the one
  way a handler can see a message twice, and it is never silent: a dispatch
  without ``redelivered`` is always the first. A handler whose effect must
  happen once checks, when ``redelivered`` is set, whether its effect is
  already there (by message id), or keeps the effect idempotent.
* after R5: the message is never dispatched again; duplicates are re-acked
  and dropped until the row expires.

So dispatch is exactly once for handlers that return before the process
dies, and at least once, flagged, for the message whose handlers were running
when it died. Marking before dispatch would make that message at most once
instead, i.e. lose it if the handler was cut off; the inbox never does that.

Dedup memory is bounded: :meth:`Inbox.expire` forgets handled messages
:data:`CLOCK_SKEW_GRACE` after their ``expires_at`` (the sender never sends a
message after its TTL, and the grace covers a receiver whose clock runs ahead
of the sender's). Unhandled rows are never expired: they were acked, so they
are the receiver's to deliver.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from villagemesh.actors.core.storage import open_database, transaction, translate
from villagemesh.errors import ConfigError, StorageError
from villagemesh.protocols.envelope import ID_BYTES

__all__ = ["CLOCK_SKEW_GRACE", "SCHEMA_VERSION", "Inbox", "MessagesFile", "check_id", "prepare"]

SCHEMA_VERSION = 2

CLOCK_SKEW_GRACE = 3600.0
"""Seconds a handled message's dedup record outlives its TTL: covers a receiver clock up to an hour ahead."""

_SCHEMA = """
CREATE TABLE outbox (
    message_id      BLOB PRIMARY KEY CHECK (length(message_id) = 16),
    recipient       TEXT NOT NULL,
    priority        INTEGER NOT NULL,
    payload         BLOB NOT NULL,
    created_at      REAL NOT NULL,
    expires_at      REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error      TEXT,
    failed          TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE inbox (
    message_id BLOB PRIMARY KEY CHECK (length(message_id) = 16),
    expires_at REAL NOT NULL,
    payload    BLOB,
    handled    INTEGER NOT NULL DEFAULT 0,
    dispatches INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX inbox_handled_expiry ON inbox (expires_at) WHERE handled = 1
"""


def check_id(message_id: object) -> bytes:
    """``message_id`` itself if it is an envelope id (``ID_BYTES`` bytes), else :class:`ConfigError` naming it."""
    if not isinstance(message_id, bytes) or len(message_id) != ID_BYTES:
        raise ConfigError(f"message id must be {ID_BYTES} bytes, got {message_id!r}")
    return message_id


def prepare(path: str | Path, *, synchronous: str = "NORMAL") -> None:
    """Create the file with its schema (or check the one there) and close it.

    Call it before starting the actors that open the file: SQLite can refuse one
    of two connections that *create* a file at the same instant (switching a new
    file to WAL takes an exclusive lock), and the retrier and the app gateway each
    open their own.
    """
    MessagesFile(path, synchronous=synchronous).close()


class MessagesFile:
    """An open messages file (this module's schema): the base of :class:`Inbox` and the retrier's ``Outbox``."""

    _what = "store"

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = open_database(
            self.path, schema=_SCHEMA, version=SCHEMA_VERSION, synchronous=synchronous
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError(f"{self.path}: the {self._what} is closed")
        return self._conn

    def close(self) -> None:
        """Close the file (idempotent). Everything written is already committed."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with translate(self.path, f"closing the {self._what}"):
                conn.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ACCEPT = "INSERT OR IGNORE INTO inbox (message_id, expires_at, payload) VALUES (?, ?, ?)"
_BEGIN = "UPDATE inbox SET dispatches = dispatches + 1 WHERE message_id = ? AND handled = 0 RETURNING dispatches"
_HANDLED = "UPDATE inbox SET handled = 1, payload = NULL WHERE message_id = ? AND handled = 0"
_BEGIN_IN = "UPDATE inbox SET dispatches = dispatches + 1 WHERE message_id IN"

_IN_MAX = 256
"""Ids one ``IN (...)`` statement names at most."""


def _padded(ids: list[bytes]) -> list[bytes]:
    """``ids`` repeated up to the next power of two (an id twice in ``IN`` is the same row once), so
    a few statement texts serve every batch size and stay in the connection's statement cache."""
    size = 1 << (len(ids) - 1).bit_length()
    return ids + [ids[-1]] * (size - len(ids))


class Inbox(MessagesFile):
    """The receiver's dedup record: each message id is accepted once, then dispatched until handled.

    Open it in the thread that will use it; the retrier and the application
    gateway each open their own. The protocol (see the module docstring):
    ``accept`` → ack → ``begin_dispatch`` → the handlers → ``mark_handled``;
    after a restart, dispatch every id of :meth:`unhandled` from :meth:`payload`.
    """

    _what = "inbox"

    def accept(self, message_id: bytes, expires_at: float, payload: bytes) -> bool:
        """Record a received message; True only the first time its id is seen.

        Atomic (``INSERT OR IGNORE``) and committed before it returns, so the
        ack that follows a True is sent for a message that survives a crash.
        The payload is kept until :meth:`mark_handled`, for re-dispatch.
        """
        check_id(message_id)
        with translate(self.path, f"accepting message {message_id.hex()}"):
            return self._db.execute(_ACCEPT, (message_id, expires_at, payload)).rowcount == 1

    def accept_many(self, messages: list[tuple[bytes, float, bytes]]) -> set[bytes]:
        """:meth:`accept` for several ``(id, expires_at, payload)`` in one transaction; the ids seen for the first time.

        Committed before it returns, so every ack sent afterwards is for a stored message.
        An id twice in ``messages`` is new once.
        """
        for message_id, _, _ in messages:
            check_id(message_id)
        if len(messages) == 1:
            message_id, expires_at, payload = messages[0]
            return {message_id} if self.accept(message_id, expires_at, payload) else set()
        new: set[bytes] = set()
        with translate(self.path, f"accepting {len(messages)} message(s)"), transaction(self._db) as db:
            for row in messages:
                if db.execute(_ACCEPT, row).rowcount == 1:
                    new.add(row[0])
        return new

    def begin_dispatch_many(self, message_ids: list[bytes]) -> dict[bytes, int]:
        """:meth:`begin_dispatch` for several messages in one transaction: id -> dispatch count, for those
        not yet handled (the others must not be dispatched)."""
        if len(message_ids) == 1:
            count = self.begin_dispatch(message_ids[0])
            return {} if count is None else {message_ids[0]: count}
        counts: dict[bytes, int] = {}
        with translate(self.path, f"dispatching {len(message_ids)} message(s)"), transaction(self._db) as db:
            for start in range(0, len(message_ids), _IN_MAX):  # one statement per 256 (each row once)
                ids = _padded(message_ids[start : start + _IN_MAX])
                sql = f"{_BEGIN_IN} ({','.join('?' * len(ids))}) AND handled = 0 RETURNING message_id, dispatches"
                counts.update((bytes(m), int(c)) for m, c in db.execute(sql, ids).fetchall())
        return counts

    def mark_handled_many(self, message_ids: list[bytes]) -> int:
        """:meth:`mark_handled` for several messages in one transaction; how many were newly marked."""
        if len(message_ids) == 1:
            return int(self.mark_handled(message_ids[0]))
        with translate(self.path, f"marking {len(message_ids)} message(s) handled"), transaction(self._db) as db:
            before = db.total_changes
            db.executemany(_HANDLED, [(m,) for m in message_ids])
            return db.total_changes - before

    def begin_dispatch(self, message_id: bytes) -> int | None:
        """Count one more dispatch of an unhandled message; committed on return, before any handler runs.

        Returns the count (1 for a first dispatch; more means the handlers may
        have seen it before the process died), or None when the message is
        already handled or unknown: it must not be dispatched.
        """
        with translate(self.path, f"dispatching message {message_id.hex()}"):
            # fetchall: the UPDATE ... RETURNING commits when its statement is done.
            rows = self._db.execute(_BEGIN, (message_id,)).fetchall()
        return int(rows[0][0]) if rows else None

    def mark_handled(self, message_id: bytes) -> bool:
        """The application has handled the message; committed on return. False if unknown or already marked."""
        with translate(self.path, f"marking message {message_id.hex()} handled"):
            return self._db.execute(_HANDLED, (message_id,)).rowcount == 1

    def mark_handled_reporting(
        self,
        message_id: bytes,
        report_id: bytes,
        recipient: str,
        priority: int,
        envelope: bytes,
        created_at: float,
        expires_at: float,
    ) -> bool:
        """:meth:`mark_handled`, and in the same commit store ``envelope`` (the outcome report
        ``report_id`` to ``recipient``) as a new outbox row, due at once, for the retrier to send."""
        check_id(report_id)
        with translate(self.path, f"marking message {message_id.hex()} handled"), transaction(self._db) as db:
            cursor = db.execute(
                "UPDATE inbox SET handled = 1, payload = NULL WHERE message_id = ? AND handled = 0", (message_id,)
            )
            db.execute(
                "INSERT OR IGNORE INTO outbox"
                " (message_id, recipient, priority, payload, created_at, expires_at, attempts, next_attempt_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                (report_id, recipient, int(priority), envelope, created_at, expires_at, created_at),
            )
            return cursor.rowcount == 1

    def settle_many(
        self, message_ids: list[bytes], reports: list[tuple[bytes, str, int, bytes, float, float]]
    ) -> set[bytes]:
        """:meth:`mark_handled` for several messages and, in the same commit, store ``reports``
        (``(report_id, recipient, priority, envelope, created_at, expires_at)``, outcome reports
        for the retrier to send, as :meth:`mark_handled_reporting` does); the ids newly marked."""
        for report in reports:
            check_id(report[0])
        marked: set[bytes] = set()
        with translate(self.path, f"settling {len(message_ids)} message(s)"), transaction(self._db) as db:
            for message_id in message_ids:
                if db.execute(_HANDLED, (message_id,)).rowcount == 1:
                    marked.add(message_id)
            db.executemany(
                "INSERT OR IGNORE INTO outbox"
                " (message_id, recipient, priority, payload, created_at, expires_at, attempts, next_attempt_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                [(i, r, int(p), e, c, x, c) for i, r, p, e, c, x in reports],
            )
        return marked

    def is_handled(self, message_id: bytes) -> bool:
        """True once :meth:`mark_handled` committed for this id."""
        with translate(self.path, f"reading message {message_id.hex()}"):
            row = self._db.execute("SELECT handled FROM inbox WHERE message_id = ?", (message_id,)).fetchone()
        return row is not None and bool(row[0])

    def unhandled(self) -> list[bytes]:
        """Ids accepted but not yet handled, in arrival order: re-dispatch them after a restart."""
        with translate(self.path, "reading unhandled messages"):
            rows = self._db.execute("SELECT message_id FROM inbox WHERE handled = 0 ORDER BY rowid").fetchall()
        return [bytes(r[0]) for r in rows]

    def unfinished(self) -> list[bytes]:
        """Ids whose dispatch began but was never marked handled, in arrival order: their handlers were cut off."""
        with translate(self.path, "reading unfinished dispatches"):
            rows = self._db.execute(
                "SELECT message_id FROM inbox WHERE handled = 0 AND dispatches > 0 ORDER BY rowid"
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    def payload(self, message_id: bytes) -> bytes | None:
        """The stored payload of an unhandled message, or None."""
        with translate(self.path, f"reading message {message_id.hex()}"):
            row = self._db.execute(
                "SELECT payload FROM inbox WHERE message_id = ? AND handled = 0", (message_id,)
            ).fetchone()
        return None if row is None else bytes(row[0])

    def expire(self, now: float) -> int:
        """Forget handled messages whose TTL ended more than :data:`CLOCK_SKEW_GRACE` ago; how many."""
        with translate(self.path, "expiring handled messages"):
            cursor = self._db.execute(
                "DELETE FROM inbox WHERE handled = 1 AND expires_at < ?", (now - CLOCK_SKEW_GRACE,)
            )
            return cursor.rowcount

    def __len__(self) -> int:
        with translate(self.path, "counting the inbox"):
            return int(self._db.execute("SELECT count(*) FROM inbox").fetchone()[0])
