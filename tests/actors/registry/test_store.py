"""PeerStore: peer records in a real SQLite file (WAL), surviving reopen; errors become StorageError."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from villagemesh.actors.registry.state import PeerRecord, expired
from villagemesh.actors.registry.store import SCHEMA_VERSION, PeerStore
from villagemesh.errors import ConfigError, StorageError
from villagemesh.protocols.discovery import Capabilities

from .strategies import records

CAPS = Capabilities(
    cpu_cores=4,
    ram_mb=4096,
    battery_percent=55.5,
    network_type="wifi",
    device_type="phone",
    performance_tier="medium",
    evolution_capacity=0.25,
    available_for_evolution=True,
    transports=("libp2p", "bitchat"),
)


def peer(peer_id: str = "p", last_seen: float = 100.0, **kwargs: object) -> PeerRecord:
    kwargs.setdefault("addresses", {"libp2p": ["libp2p://127.0.0.1:4001"]})
    kwargs.setdefault("capabilities", CAPS)
    kwargs.setdefault("public_key", b"\x01" * 32)
    return PeerRecord(peer_id=peer_id, last_seen=last_seen, **kwargs)  # type: ignore[arg-type]


def test_reopened_store_returns_the_same_peers(tmp_path: Path) -> None:
    """Everything upserted is there, equal, after close and reopen."""
    path = tmp_path / "peers.db"
    recs = [peer("a", trust=0.75, latency_ms=12.5, source="lan"), peer("b", capabilities=None, public_key=None)]
    with PeerStore(path) as store:
        store.upsert_many(recs)
    with PeerStore(path) as store:
        assert store.all() == recs
        assert store.get("a") == recs[0] and store.get("zzz") is None
        assert len(store) == 2


def test_upsert_replaces_the_whole_record(tmp_path: Path) -> None:
    """The store writes what it is given (merging is the caller's job)."""
    with PeerStore(tmp_path / "peers.db") as store:
        store.upsert(peer("a", trust=0.9))
        store.upsert(peer("a", last_seen=200.0, addresses={}, capabilities=None))
        assert store.all() == [peer("a", last_seen=200.0, addresses={}, capabilities=None)]


def test_remove_forgets_a_peer(tmp_path: Path) -> None:
    """remove() says whether the peer was known."""
    with PeerStore(tmp_path / "peers.db") as store:
        store.upsert(peer("a"))
        assert store.remove("a") is True
        assert store.remove("a") is False
        assert store.all() == []


def test_expire_removes_exactly_the_stale_peers(tmp_path: Path) -> None:
    """Same rule as state.expired: older than max_age goes; the ids come back sorted."""
    recs = [peer("c", last_seen=10.0), peer("a", last_seen=39.0), peer("b", last_seen=40.0), peer("d", last_seen=99.0)]
    with PeerStore(tmp_path / "peers.db") as store:
        store.upsert_many(recs)
        assert store.expire(now=100.0, max_age=60.0) == expired(recs, 100.0, 60.0) == ["a", "c"]
        assert [r.peer_id for r in store.all()] == ["b", "d"]


def test_file_uses_wal_and_records_its_schema_version(tmp_path: Path) -> None:
    """journal_mode is wal and user_version is the schema version, as seen by another connection."""
    path = tmp_path / "peers.db"
    PeerStore(path).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_file_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    """A newer villagemesh's file is a StorageError naming the path, not a guess."""
    path = tmp_path / "peers.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(StorageError, match=r"peers\.db.*schema version 99"):
        PeerStore(path)


def test_file_that_is_not_sqlite_is_a_storage_error(tmp_path: Path) -> None:
    """Garbage in the file: StorageError from the sqlite3 error, naming the path."""
    path = tmp_path / "peers.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match=r"peers\.db") as info:
        PeerStore(path)
    assert isinstance(info.value.__cause__, sqlite3.Error)


def test_unreadable_row_is_a_storage_error_naming_the_peer(tmp_path: Path) -> None:
    """A hand-edited row that does not decode is reported, not half-loaded."""
    path = tmp_path / "peers.db"
    with PeerStore(path) as store:
        store.upsert(peer("a"))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE peers SET capabilities = '{\"cpu_cores\": -1}'")
    conn.commit()
    conn.close()
    with PeerStore(path) as store, pytest.raises(StorageError, match="peer 'a'"):
        store.all()


def test_closed_store_refuses_use_and_close_is_idempotent(tmp_path: Path) -> None:
    """After close, any call is a StorageError; a second close is fine."""
    store = PeerStore(tmp_path / "peers.db")
    store.close()
    store.close()
    with pytest.raises(StorageError, match="closed"):
        store.all()


def test_store_used_from_another_thread_is_a_storage_error(tmp_path: Path) -> None:
    """One connection, one thread: misuse is caught, not a silent race."""
    import threading

    store = PeerStore(tmp_path / "peers.db")
    errors: list[BaseException] = []

    def use() -> None:
        try:
            store.all()
        except StorageError as exc:
            errors.append(exc)

    thread = threading.Thread(target=use)
    thread.start()
    thread.join()
    store.close()
    assert len(errors) == 1 and "thread" in str(errors[0])


def test_unknown_synchronous_mode_is_refused(tmp_path: Path) -> None:
    """Only NORMAL and FULL are offered."""
    with pytest.raises(ConfigError, match="OFF"):
        PeerStore(tmp_path / "peers.db", synchronous="OFF")


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(records(), max_size=8, unique_by=lambda r: r.peer_id))
def test_any_records_round_trip_through_the_file(tmp_path: Path, recs: list[PeerRecord]) -> None:
    """Whatever valid records go in come out equal after a reopen."""
    path = tmp_path / "roundtrip.db"
    path.unlink(missing_ok=True)
    with PeerStore(path) as store:
        store.upsert_many(recs)
    with PeerStore(path) as store:
        assert store.all() == sorted(recs, key=lambda r: r.peer_id)
