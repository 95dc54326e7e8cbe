"""Opening villagemesh's SQLite files the one right way, and translating their errors.

Part of the actor kit: every actor that keeps a file uses it (the peer
registry's store, the messages file of :mod:`.ledger`); no actor opens SQLite
any other way.

Every file is opened with:

``PRAGMA journal_mode=WAL``
    Readers never block the writer, and a commit is one append to the
    write-ahead log: a process killed at any instant (``kill -9``) leaves
    every committed transaction in the file and no torn one.
``PRAGMA synchronous=NORMAL`` (default; ``FULL`` on request)
    In WAL mode NORMAL syncs the log at checkpoints, not at every commit. A
    committed transaction is in the OS page cache when ``commit`` returns, so
    it survives the death of the *process*; only an OS crash or power cut can
    lose the last transactions (never corrupt the file). FULL syncs every
    commit, survives power loss too, and costs one fsync per transaction.
``PRAGMA user_version``
    The schema version. A new file gets the schema and the version in one
    transaction; a file of the expected version is used as is; an older one
    is migrated step by step by the store's own scripts (version n to n + 1,
    all in one transaction with the new version number: a kill mid-way leaves
    the old file); any other version (a newer villagemesh, a foreign file, an
    old one with no migration) is refused with :class:`StorageError`, never
    guessed at.
``PRAGMA wal_autocheckpoint=0``
    No automatic checkpoints: a node's keeper actor checkpoints its stores
    every ``checkpoint_interval`` (and advances their generation in the
    emptied log, so that a deleted log is noticed at the next start; see
    :mod:`villagemesh.actors.core.integrity`). Closing the last connection still
    checkpoints, as SQLite always does.
``PRAGMA quick_check``
    On open: a file with a damaged page is refused (StorageError naming the
    file and what the check found) before anything reads or writes it.
``isolation_level=None``
    Autocommit: each statement is its own transaction unless the store opens
    one with ``BEGIN IMMEDIATE`` (:func:`transaction`), so commit points are
    explicit in the code that states them.

One connection per store, used from the thread that opened it (sqlite3's
``check_same_thread``): a store belongs to one actor, and the actor opens it
in ``on_start``, in its own thread.

Every ``sqlite3.Error`` becomes :class:`StorageError` naming the file and what
was being done (:func:`translate`), ``from`` the original.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from villagemesh.errors import ConfigError, StorageError

__all__ = ["SYNCHRONOUS_MODES", "open_database", "transaction", "translate"]

SYNCHRONOUS_MODES = ("NORMAL", "FULL")
"""The durability levels offered (OFF could corrupt a file on power loss; EXTRA adds nothing here)."""

BUSY_TIMEOUT_S = 5.0
"""How long a statement waits for another connection's lock (a second store on the same file)."""


@contextmanager
def translate(path: str | Path, doing: str) -> Iterator[None]:
    """Turn any ``sqlite3.Error`` inside into :class:`StorageError` naming ``path`` and ``doing``."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StorageError(f"{path}: {doing} failed: {type(exc).__name__}: {exc}") from exc


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: ``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back if the body raises.

    The commit is the durability point: when the ``with`` block exits normally,
    the changes survive a kill of the process.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def open_database(
    path: str | Path,
    *,
    schema: str,
    version: int,
    synchronous: str = "NORMAL",
    migrations: Mapping[int, str] | None = None,
) -> sqlite3.Connection:
    """Open (creating if needed) the SQLite file at ``path`` with WAL and the given schema version.

    ``schema`` is the SQL script that creates every table of ``version``;
    ``migrations[n]`` the script that takes a file of version ``n`` to ``n + 1``.

    Raises:
        ConfigError: ``synchronous`` is not one of :data:`SYNCHRONOUS_MODES`.
        StorageError: the file cannot be opened, is not SQLite, or has another schema version.
    """
    if synchronous not in SYNCHRONOUS_MODES:
        raise ConfigError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {synchronous!r}")
    with translate(path, "opening the database"):
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT_S)
    try:
        with translate(path, "configuring the database"):
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(f"{path}: cannot use write-ahead logging (journal_mode is {mode!r})")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA wal_autocheckpoint=0")
        with translate(path, "checking the database"):
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise StorageError(f"{path}: the database is damaged (PRAGMA quick_check: {'; '.join(problems)})")
        with translate(path, "checking the schema version"), transaction(conn):
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found == 0:
                for statement in _statements(schema):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={int(version)}")
            elif found != version:
                scripts = migrations or {}
                steps = range(found, version) if 0 < found < version else range(0)
                if not steps or any(step not in scripts for step in steps):
                    raise StorageError(
                        f"{path}: schema version {found} is not the {version} this villagemesh reads"
                        " (written by another version?)"
                    )
                for step in steps:
                    for statement in _statements(scripts[step]):
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={int(version)}")
    except BaseException:
        conn.close()
        raise
    return conn


def _statements(script: str) -> list[str]:
    """Split a schema script on ';' (schema scripts here hold no string literals with ';')."""
    return [s.strip() for s in script.split(";") if s.strip()]
