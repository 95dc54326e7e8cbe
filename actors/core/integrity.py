"""The data dir's integrity: each store checked on open, and a manifest that remembers them.

SQLite's write-ahead log keeps every *committed* transaction through a kill of
the process, and no torn one. What it cannot do is notice that a file around it
went missing or back in time: an empty file is a new database to SQLite, a
database without its ``-wal`` is simply older, and a ``-wal`` cut short or
damaged is read up to its last valid commit, silently. A node that started on
such a data dir would lose its queued messages without a word. So the data dir
keeps a small manifest next to its stores::

    manifest.json   {"format": 1, "node_id": "…",
                     "stores": {"messages.sqlite3": {"store_id": "…", "generation": 7,
                                                     "checkpointed_at": 1764741600.0,
                                                     "counts": {"outbox": 300, "inbox": 0}}, …}}

and each store keeps its own identity and generation in one row of
:data:`STORE_TABLE`. At every checkpoint (:func:`checkpoint`: the node's start,
then the keeper actor every ``checkpoint_interval`` seconds while the log grew)
the log is copied into the database and emptied (``wal_checkpoint(TRUNCATE)``),
then the store's generation is advanced *in the now empty log*, then the
manifest records that generation (written to a temporary file, fsynced, renamed).

So the database file alone always holds a generation *below* the manifest's
while the log is there: a deleted or lost ``-wal`` shows as a store rolled back,
not as a quietly older one. On open (:func:`inspect`) every store is checked::

    missing       the file is gone (its -wal may be left, useless without it)
    empty         0 bytes (SQLite would take it for a new database)
    damaged log   the -wal ends in a partial frame, or valid frames follow a damaged one
    corrupt       PRAGMA quick_check fails, or the file is not SQLite at all
    foreign       another schema version, or a table the node needs is absent
    replaced      its store identity is not the one the manifest recorded
    rolled back   its generation is below the manifest's (its -wal was deleted)

What stays undetectable, and the bound on it: a log cut exactly at a frame
boundary after the last checkpoint looks like a log that simply ended there.
The keeper checkpoints every ``checkpoint_interval`` seconds (1 s by default)
whenever the log grew, so what such a cut can lose is at most the transactions
committed since the last checkpoint. A log that ends in an incomplete
*transaction* (valid frames without a commit frame) is normal after a kill:
those frames were never committed, and SQLite rightly ignores them.

Every connection a node opens on its stores turns SQLite's automatic
checkpoints off (``wal_autocheckpoint=0``, see :mod:`.storage`): an automatic
checkpoint would copy the generation into the database file and let a later
deleted log go unnoticed. The keeper's checkpoints replace them.
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from villagemesh.errors import StorageError

__all__ = [
    "MANIFEST_FILE",
    "STORE_TABLE",
    "Finding",
    "Manifest",
    "StoreRecord",
    "StoreSpec",
    "advance",
    "checkpoint",
    "describe",
    "inspect",
    "open_for_checkpoints",
    "scan_wal",
    "set_aside",
]

MANIFEST_FILE = "manifest.json"
"""The manifest's name in the data dir."""

MANIFEST_FORMAT = 1

STORE_TABLE = "villagemesh_store"
"""One row per store: its identity (a random id made with the file) and its generation."""

_STORE_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {STORE_TABLE} (one INTEGER PRIMARY KEY CHECK (one = 1),"
    " store_id TEXT NOT NULL, generation INTEGER NOT NULL, created_at REAL NOT NULL)"
)

_WAL_MAGIC = (0x377F0682, 0x377F0683)
_WAL_HEADER = 32
_FRAME_HEADER = 24


@dataclass(frozen=True)
class StoreSpec:
    """One SQLite file of the data dir: its name, schema version, tables, and what to count in it."""

    file: str
    version: int
    tables: tuple[str, ...]
    counts: tuple[tuple[str, str], ...] = ()
    """``(label, SQL giving one integer)``: what the manifest records, and what a loss would cost."""
    migrates_from: tuple[int, ...] = ()
    """Older schema versions the store migrates when it opens (not foreign; their tables as now)."""


@dataclass(frozen=True)
class Finding:
    """One inconsistency of the data dir: the file, what is wrong, and what starting anyway would lose."""

    file: str
    problem: str
    detail: str
    lost: str

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}: {self.detail}; starting anyway would lose {self.lost}"


@dataclass
class StoreRecord:
    """What the manifest remembers of one store at its last checkpoint."""

    store_id: str
    generation: int
    checkpointed_at: float
    counts: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """What the store held at that checkpoint, for a person."""
        held = ", ".join(f"{n} {label}" for label, n in self.counts.items()) or "its records"
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.checkpointed_at))
        return f"{held} (as of its checkpoint at {when}, generation {self.generation})"


@dataclass
class Manifest:
    """The data dir's record of its node and its stores (``manifest.json``)."""

    node_id: str
    stores: dict[str, StoreRecord] = field(default_factory=dict)

    @classmethod
    def load(cls, data_dir: Path) -> Manifest | None:
        """The manifest of ``data_dir``, or None if it has none; StorageError if it is unreadable."""
        path = data_dir / MANIFEST_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"{path}: cannot read the data dir's manifest: {exc.strerror}") from exc
        try:
            doc = json.loads(raw)
            if doc.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {MANIFEST_FORMAT}")
            stores = {
                name: StoreRecord(
                    str(rec["store_id"]),
                    int(rec["generation"]),
                    float(rec["checkpointed_at"]),
                    {str(k): int(v) for k, v in dict(rec.get("counts", {})).items()},
                )
                for name, rec in dict(doc["stores"]).items()
            }
            return cls(str(doc["node_id"]), stores)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StorageError(
                f"{path}: the data dir's manifest is unreadable ({exc}); it cannot vouch for the stores"
                " (move it away to start without it: the stores are then trusted as they are)"
            ) from exc

    def save(self, data_dir: Path) -> None:
        """Write the manifest atomically: a temporary file, fsynced, renamed over the old one."""
        path = data_dir / MANIFEST_FILE
        doc = {
            "format": MANIFEST_FORMAT,
            "node_id": self.node_id,
            "stores": {
                name: {
                    "store_id": rec.store_id,
                    "generation": rec.generation,
                    "checkpointed_at": rec.checkpointed_at,
                    "counts": rec.counts,
                }
                for name, rec in sorted(self.stores.items())
            },
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as out:
                out.write(json.dumps(doc, indent=1).encode())
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(data_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StorageError(f"{path}: cannot write the data dir's manifest: {exc.strerror}") from exc


# -- inspection ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Seen:
    """What one store looked like on inspection."""

    exists: bool
    store_id: str | None = None
    generation: int = 0
    counts: dict[str, int] = field(default_factory=dict)


def inspect(data_dir: Path, specs: tuple[StoreSpec, ...], manifest: Manifest | None) -> list[Finding]:
    """Every inconsistency of the stores of ``data_dir`` against ``manifest``; nothing is changed.

    Without a manifest (a new data dir, or one from before manifests), a store that
    is missing or empty while another store has history (an identity) is a finding.
    """
    findings: list[Finding] = []
    seen: dict[str, _Seen] = {}
    for spec in specs:
        record = manifest.stores.get(spec.file) if manifest is not None else None
        found, state = _inspect_one(data_dir, spec, record)
        findings.extend(found)
        seen[spec.file] = state
    if manifest is None:
        with_history = [name for name, s in seen.items() if s.store_id is not None]
        for spec in specs:
            state = seen[spec.file]
            path = data_dir / spec.file
            if with_history and state.store_id is None and not any(f.file == spec.file for f in findings):
                what = "missing" if not state.exists else ("empty" if path.stat().st_size == 0 else "")
                if what:
                    others = ", ".join(n for n in with_history if n != spec.file)
                    findings.append(
                        Finding(spec.file, what, f"while {others} has history (and the manifest is gone)", "unknown")
                    )
    return findings


def _inspect_one(data_dir: Path, spec: StoreSpec, record: StoreRecord | None) -> tuple[list[Finding], _Seen]:
    path = data_dir / spec.file
    wal = path.with_name(path.name + "-wal")
    lost = record.describe() if record is not None else "what it held"
    if not path.exists():
        if record is None:
            return [], _Seen(False)
        orphan = " (its -wal is left, which SQLite cannot replay without the database)" if wal.exists() else ""
        return [Finding(spec.file, "missing", f"the file is gone{orphan}", lost)], _Seen(False)
    if path.stat().st_size == 0:
        if record is None:
            return [], _Seen(True)
        return [Finding(spec.file, "empty", "0 bytes (SQLite would take it for a new database)", lost)], _Seen(True)
    findings: list[Finding] = []
    if wal.exists():
        try:
            damage = scan_wal(wal.read_bytes())
        except OSError as exc:
            raise StorageError(f"{wal}: cannot read the write-ahead log: {exc.strerror}") from exc
        if damage is not None:
            findings.append(
                Finding(spec.file, "damaged log", f"{wal.name}: {damage}", "the transactions in its damaged part")
            )
    try:
        state = _read_store(path, spec)
    except _Unusable as exc:
        findings.append(Finding(spec.file, exc.problem, exc.detail, lost))
        return findings, _Seen(True)
    if record is not None:
        if state.store_id is None:
            findings.append(Finding(spec.file, "replaced", "it has no store identity (a new or foreign file)", lost))
        elif state.store_id != record.store_id:
            findings.append(
                Finding(
                    spec.file,
                    "replaced",
                    f"its store identity is {state.store_id}, the manifest recorded {record.store_id}",
                    lost,
                )
            )
        elif state.generation < record.generation:
            now = ", ".join(f"{n} {label}" for label, n in state.counts.items())
            findings.append(
                Finding(
                    spec.file,
                    "rolled back",
                    f"generation {state.generation}, the manifest recorded {record.generation}"
                    f" (its -wal was deleted or replaced){'; it holds ' + now + ' now' if now else ''}",
                    f"what was committed after its last checkpoint, which held {lost}",
                )
            )
    return findings, state


class _Unusable(Exception):
    def __init__(self, problem: str, detail: str) -> None:
        super().__init__(detail)
        self.problem = problem
        self.detail = detail


def _read_store(path: Path, spec: StoreSpec) -> _Seen:
    """Open ``path`` read-only and read its identity and counts.

    Read-only, so that closing this connection cannot checkpoint the store (the last
    connection of a file to close checkpoints it): inspection changes nothing.
    """
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=5.0)
    except sqlite3.Error as exc:
        raise _Unusable("corrupt", f"cannot be opened: {exc}") from exc
    try:
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            check = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
        except sqlite3.DatabaseError as exc:
            raise _Unusable("corrupt", f"not a readable SQLite database: {exc}") from exc
        if check != ["ok"]:
            raise _Unusable("corrupt", f"PRAGMA quick_check: {'; '.join(check)}")
        if version != spec.version and version not in spec.migrates_from:
            raise _Unusable("foreign", f"schema version {version}, expected {spec.version}")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        absent = sorted(set(spec.tables) - tables)
        if absent:
            raise _Unusable("foreign", f"it lacks the table(s) {', '.join(absent)}")
        identity = None
        if STORE_TABLE in tables:
            identity = conn.execute(f"SELECT store_id, generation FROM {STORE_TABLE}").fetchone()
        counts = {label: int(conn.execute(sql).fetchone()[0]) for label, sql in spec.counts}
        if identity is None:
            return _Seen(True, None, 0, counts)
        return _Seen(True, str(identity[0]), int(identity[1]), counts)
    except sqlite3.DatabaseError as exc:
        raise _Unusable("corrupt", f"reading it failed: {exc}") from exc
    finally:
        conn.close()


def scan_wal(data: bytes) -> str | None:
    """What is wrong with a write-ahead log's content, or None if SQLite reads all it committed.

    SQLite reads frames while their salts match the header's and their cumulative
    checksums hold, and stops silently at the first that does not. Normal ends of a
    log: its last byte, or stale frames of an earlier cycle (other salts). Damage:
    a header that does not check, a partial frame at the end, or frames of this
    cycle after one that does not check (what follows it is lost).
    """
    if len(data) == 0:
        return None
    if len(data) < _WAL_HEADER:
        return f"{len(data)} bytes, shorter than a log header"
    magic, _version, page_size, _seq, salt1, salt2, ck1, ck2 = struct.unpack(">8I", data[:_WAL_HEADER])
    if magic not in _WAL_MAGIC:
        return "its header is not a write-ahead log's (SQLite ignores the whole log)"
    order = ">" if magic & 1 else "<"
    if (ck1, ck2) != _checksum(order, data[:24], 0, 0):
        return "its header checksum fails (SQLite ignores the whole log)"
    frame = _FRAME_HEADER + page_size
    body = len(data) - _WAL_HEADER
    s1, s2 = ck1, ck2
    offset, index, broken = _WAL_HEADER, 0, None
    while offset + frame <= len(data):
        header = data[offset : offset + _FRAME_HEADER]
        _pgno, _commit, f_salt1, f_salt2, f_ck1, f_ck2 = struct.unpack(">6I", header)
        ours = (f_salt1, f_salt2) == (salt1, salt2)
        if broken is None:
            if not ours:
                broken = index  # a stale frame: the log's valid part ended here
            else:
                s1, s2 = _checksum(order, header[:8], s1, s2)
                s1, s2 = _checksum(order, data[offset + _FRAME_HEADER : offset + frame], s1, s2)
                if (s1, s2) != (f_ck1, f_ck2):
                    broken = index
        elif ours and index > broken:
            return f"frame {broken} does not check but frame {index} after it belongs to the log: damaged in the middle"
        offset += frame
        index += 1
    if body % frame:
        return f"{len(data)} bytes end in a partial frame (frames are {frame} bytes): the log was cut or overwritten"
    return None


def _checksum(order: str, data: bytes, s1: int, s2: int) -> tuple[int, int]:
    words = struct.unpack(f"{order}{len(data) // 4}I", data)
    mask = 0xFFFFFFFF
    for i in range(0, len(words), 2):
        s1 = (s1 + words[i] + s2) & mask
        s2 = (s2 + words[i + 1] + s1) & mask
    return s1, s2


# -- remedies and checkpoints -------------------------------------------------------------------------


def set_aside(data_dir: Path, finding: Finding) -> list[str]:
    """What starting anyway does about ``finding`` (``--accept-loss``); the names of the files moved away.

    A store that cannot be used as is (empty, corrupt, foreign, missing with its log
    left) is moved to ``<file>.lost-<UTC time>`` with its ``-wal`` and ``-shm``, so
    the node starts a new one; a replaced, rolled-back or damaged-log store is kept
    as it is (SQLite reads what it still holds) and the manifest adopts it.
    """
    if finding.problem not in ("missing", "empty", "corrupt", "foreign"):
        return []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for suffix in ("", "-wal", "-shm"):
        path = data_dir / (finding.file + suffix)
        if path.exists():
            target = path.with_name(f"{finding.file}.lost-{stamp}{suffix}")
            try:
                os.replace(path, target)
            except OSError as exc:
                raise StorageError(f"{path}: cannot move it aside to {target.name}: {exc.strerror}") from exc
            moved.append(target.name)
    return moved


def checkpoint(data_dir: Path, spec: StoreSpec, conn: sqlite3.Connection) -> StoreRecord | None:
    """Checkpoint one store and advance its generation in the emptied log; its new record.

    ``conn`` is a connection on ``data_dir / spec.file`` (the caller's, kept open).
    None when the checkpoint could not complete (a reader held the log): nothing
    is advanced, the next checkpoint tries again.
    """
    path = data_dir / spec.file
    try:
        conn.execute(_STORE_SCHEMA)
        conn.execute(
            f"INSERT OR IGNORE INTO {STORE_TABLE} (one, store_id, generation, created_at) VALUES (1, ?, 0, ?)",
            (uuid.uuid4().hex, time.time()),
        )
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            return None
        now = time.time()
        counts = {label: int(conn.execute(sql).fetchone()[0]) for label, sql in spec.counts}
        row = conn.execute(
            f"UPDATE {STORE_TABLE} SET generation = generation + 1 RETURNING store_id, generation"
        ).fetchall()[0]
    except sqlite3.Error as exc:
        raise StorageError(f"{path}: checkpointing failed: {type(exc).__name__}: {exc}") from exc
    return StoreRecord(str(row[0]), int(row[1]), now, counts)


def open_for_checkpoints(path: Path) -> sqlite3.Connection:
    """A connection on an existing store for :func:`checkpoint` (no automatic checkpoints of its own)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None, timeout=5.0)
        conn.execute("PRAGMA wal_autocheckpoint=0")
    except sqlite3.Error as exc:
        raise StorageError(f"{path}: cannot open it for checkpoints: {exc}") from exc
    return conn


def describe(findings: list[Finding]) -> str:
    """Every finding, one per line, for an error message or the doctor's report."""
    return "\n".join(f"  {f}" for f in findings)


def advance(data_dir: Path, manifest: Manifest, spec: StoreSpec, conn: sqlite3.Connection) -> StoreRecord | None:
    """:func:`checkpoint` one store, then record its new generation in the manifest (saved); the record."""
    record = checkpoint(data_dir, spec, conn)
    if record is not None:
        manifest.stores[spec.file] = record
        manifest.save(data_dir)
    return record
