"""The retrier's private store: the sender's :class:`Outbox`, in the messages file.

The file, its schema and its exactly-once commit points are the kit's
:mod:`villagemesh.actors.core.ledger` (which also holds the receiver's
:class:`~villagemesh.actors.core.ledger.Inbox`, shared with the app gateway).
This module is the outbox table's only reader and writer.
"""


from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from villagemesh.actors.core.ledger import MessagesFile, check_id
from villagemesh.actors.core.storage import transaction, translate
from villagemesh.errors import ConfigError, StorageError
from villagemesh.protocols.envelope import Priority

from .state import Backoff, Decision, Delivered, Enqueue, Failed, Send

__all__ = ["Outbox", "OutboxRow"]

_INSERT = (
    "INSERT OR IGNORE INTO outbox"
    " (message_id, recipient, priority, payload, created_at, expires_at, attempts, next_attempt_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SEND = "UPDATE outbox SET attempts = ?, next_attempt_at = ? WHERE message_id = ?"
_BACKOFF = "UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_error = ?, failed = ? WHERE message_id = ?"
_DELETE = "DELETE FROM outbox WHERE message_id = ?"


def _new_row(
    message_id: bytes, recipient: str, priority: Priority, payload: bytes, created_at: float, expires_at: float
) -> tuple[Any, ...]:
    """An outbox row for :data:`_INSERT`: no attempt yet, due at ``created_at``."""
    check_id(message_id)
    if not isinstance(priority, Priority):
        raise ConfigError(f"priority of {message_id.hex()} must be a Priority, got {priority!r}")
    return (message_id, recipient, int(priority), payload, created_at, expires_at, 0, created_at)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One unacknowledged message as the outbox keeps it (without its payload)."""

    message_id: bytes
    recipient: str
    priority: Priority
    created_at: float
    expires_at: float
    attempts: int
    next_attempt_at: float
    last_error: str | None
    failed: tuple[str, ...]

    def to_enqueue(self, now: float) -> Enqueue:
        """The event that restores this message into a fresh :class:`.state.RetrierState`."""
        return Enqueue(
            self.message_id,
            self.recipient,
            self.priority,
            expires_at=self.expires_at,
            now=now,
            attempts=self.attempts,
            next_attempt_at=self.next_attempt_at,
            last_error=self.last_error,
            failed=self.failed,
        )


_ROW_COLUMNS = "message_id, recipient, priority, created_at, expires_at, attempts, next_attempt_at, last_error, failed"


class Outbox(MessagesFile):
    """The sender's persistent outbox: every message not yet acked, failed or expired.

    Open it in the thread that will use it (the retrier actor's ``on_start``).
    """

    _what = "outbox"

    def put(
        self,
        message_id: bytes,
        recipient: str,
        priority: Priority,
        payload: bytes,
        *,
        created_at: float,
        expires_at: float,
        send: Send | None = None,
    ) -> bool:
        """Store a new message; committed on return. False if the id is already there.

        The row is due at once; or, given ``send`` (the state's decision to send
        this message, taken before it was stored), it is stored with that
        attempt counted and its deadline as the next attempt time, as
        :meth:`apply` would store the ``Send``: S1 and S2 in one commit. One
        statement, so one SQLite call and its own transaction.
        """
        row = _new_row(message_id, recipient, priority, payload, created_at, expires_at)
        if send is not None:
            if send.message_id != message_id:
                raise ConfigError(f"a Send for {send.message_id.hex()} stored with message {message_id.hex()}")
            row = (*row[:6], send.attempt, send.deadline)
        with translate(self.path, f"storing message {message_id.hex()}"):
            return self._db.execute(_INSERT, row).rowcount == 1

    def put_many(self, messages: Iterable[tuple[bytes, str, Priority, bytes, float, float]]) -> int:
        """Store several ``(id, recipient, priority, payload, created_at, expires_at)`` in one transaction.

        Returns how many were new (ids already present are left untouched).
        """
        rows = [_new_row(*message) for message in messages]
        with translate(self.path, f"storing {len(rows)} message(s)"), transaction(self._db) as db:
            before = db.total_changes
            db.executemany(_INSERT, rows)
            return db.total_changes - before

    def put_batch(
        self,
        messages: list[tuple[bytes, str, Priority, bytes, float, float, Send | None]],
        decisions: Iterable[Decision] = (),
    ) -> None:
        """Store new messages and persist ``decisions`` in one transaction (the group commit of many ``Deliver``).

        Each message is ``(id, recipient, priority, payload, created_at, expires_at, send)``,
        stored as :meth:`put` stores it (``send``: its first attempt, counted); ``decisions``
        are the state's other decisions of the same turn, applied after the inserts as
        :meth:`apply` does. Committed on return.

        Raises:
            StorageError: an id was already stored (the caller's state should have known it).
        """
        rows = []
        for message_id, recipient, priority, payload, created_at, expires_at, send in messages:
            row = _new_row(message_id, recipient, priority, payload, created_at, expires_at)
            if send is not None:
                row = (*row[:6], send.attempt, send.deadline)
            rows.append(row)
        changes = self._changes(decisions)
        if len(rows) == 1 and not changes:  # one statement is its own transaction (a lone send's latency)
            with translate(self.path, f"storing message {rows[0][0].hex()}"):
                if self._db.execute(_INSERT, rows[0]).rowcount != 1:
                    raise StorageError(f"{self.path}: 1 of 1 new message(s) were stored already")
            return
        with translate(self.path, f"storing {len(rows)} message(s)"), transaction(self._db) as db:
            before = db.total_changes
            db.executemany(_INSERT, rows)
            stored = db.total_changes - before
            if stored != len(rows):
                already = len(rows) - stored
                raise StorageError(f"{self.path}: {already} of {len(rows)} new message(s) were stored already")
            for sql, params in changes:
                db.executemany(sql, params)

    @staticmethod
    def _changes(decisions: Iterable[Decision]) -> list[tuple[str, list[tuple[Any, ...]]]]:
        """The statements that persist ``decisions`` (see :meth:`apply`), in decision order: a run of
        the same statement is one ``executemany`` (a Backoff then a Send of one message stay in order)."""
        changes: list[tuple[str, list[tuple[Any, ...]]]] = []
        for d in decisions:
            row: tuple[Any, ...]
            if isinstance(d, Send):
                sql, row = _SEND, (d.attempt, d.deadline, d.message_id)
            elif isinstance(d, Backoff):
                sql, row = _BACKOFF, (d.attempts, d.next_attempt_at, d.last_error, json.dumps(d.failed), d.message_id)
            elif isinstance(d, Delivered | Failed):
                sql, row = _DELETE, (d.message_id,)
            else:
                continue
            if changes and changes[-1][0] is sql:
                changes[-1][1].append(row)
            else:
                changes.append((sql, [row]))
        return changes

    def apply(self, decisions: Iterable[Decision]) -> None:
        """Persist what :class:`.state.RetrierState` decided, in one transaction, before acting on it.

        ``Send`` stores the attempt count and its deadline as the next attempt
        time; ``Backoff`` the count, time, error and failed transports;
        ``Delivered`` and ``Failed`` delete the row. ``NextWakeup`` is not stored.
        A single row change (the common case: one ack's delete) is one statement,
        atomic by itself, without ``BEGIN``/``COMMIT`` around it.
        """
        changes = self._changes(decisions)
        if not changes:
            return
        with translate(self.path, "recording delivery decisions"):
            if len(changes) == 1 and len(changes[0][1]) == 1:
                self._db.execute(changes[0][0], changes[0][1][0])
                return
            with transaction(self._db) as db:
                for sql, rows in changes:
                    db.executemany(sql, rows)

    def delete(self, message_id: bytes) -> bool:
        """Forget a message (acked or given up on); True if it was there."""
        with translate(self.path, f"deleting message {message_id.hex()}"):
            return self._db.execute(_DELETE, (message_id,)).rowcount > 0

    def payload(self, message_id: bytes) -> bytes | None:
        """The stored payload (the encoded envelope), or None if the message is gone."""
        with translate(self.path, f"reading message {message_id.hex()}"):
            row = self._db.execute("SELECT payload FROM outbox WHERE message_id = ?", (message_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def get(self, message_id: bytes) -> OutboxRow | None:
        """One message's row, or None."""
        with translate(self.path, f"reading message {message_id.hex()}"):
            row = self._db.execute(f"SELECT {_ROW_COLUMNS} FROM outbox WHERE message_id = ?", (message_id,)).fetchone()
        return None if row is None else self._row(row)

    def pending(self) -> list[OutboxRow]:
        """Every stored message, oldest first: what a restarted retrier replays."""
        with translate(self.path, "reading the outbox"):
            rows = self._db.execute(f"SELECT {_ROW_COLUMNS} FROM outbox ORDER BY created_at, message_id").fetchall()
        return [self._row(r) for r in rows]

    def __len__(self) -> int:
        with translate(self.path, "counting the outbox"):
            return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def _row(self, row: tuple[Any, ...]) -> OutboxRow:
        message_id, recipient, priority, created_at, expires_at, attempts, next_at, last_error, failed = row
        try:
            transports = json.loads(failed)
            if not isinstance(transports, list) or not all(isinstance(t, str) for t in transports):
                raise ValueError(f"failed is not a list of transport names: {failed!r}")
            return OutboxRow(
                bytes(message_id),
                recipient,
                Priority(priority),
                created_at,
                expires_at,
                attempts,
                next_at,
                last_error,
                tuple(transports),
            )
        except ValueError as exc:
            raise StorageError(f"{self.path}: message {bytes(message_id).hex()} has an unreadable row: {exc}") from exc
