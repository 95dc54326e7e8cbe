"""The data dir's integrity checks on real SQLite files: the write-ahead log scan, inspection, remedies."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from villagemesh.actors.core.integrity import (
    Finding,
    Manifest,
    StoreSpec,
    advance,
    inspect,
    open_for_checkpoints,
    scan_wal,
    set_aside,
)
from villagemesh.errors import StorageError

SPEC = StoreSpec("s.sqlite3", 1, ("t",), (("row(s)", "SELECT count(*) FROM t"),))


def store(data: Path) -> sqlite3.Connection:
    """A store with a schema version, a table, autocheckpoints off; its connection stays open."""
    conn = sqlite3.connect(data / SPEC.file, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
    conn.execute("PRAGMA user_version=1")
    return conn


def wal_bytes(tmp_path: Path, rows: int = 20) -> bytes:
    conn = store(tmp_path)
    for i in range(rows):
        conn.execute("INSERT INTO t VALUES (?)", (os.urandom(200) + bytes([i]),))
    data = (tmp_path / f"{SPEC.file}-wal").read_bytes()
    conn.close()
    return data


def test_a_log_as_sqlite_wrote_it_is_whole(tmp_path):
    assert scan_wal(wal_bytes(tmp_path)) is None
    assert scan_wal(b"") is None


def test_a_cut_log_ends_in_a_partial_frame(tmp_path):
    data = wal_bytes(tmp_path)
    assert "partial frame" in (scan_wal(data[: len(data) // 2 + 7]) or "")
    assert "partial frame" in (scan_wal(data + os.urandom(4096)) or "")


def test_a_frame_damaged_in_the_middle_is_found(tmp_path):
    data = bytearray(wal_bytes(tmp_path))
    frame = 24 + int.from_bytes(data[8:12], "big")
    middle = 32 + 3 * frame + 100
    data[middle : middle + 16] = os.urandom(16)
    assert "damaged in the middle" in (scan_wal(bytes(data)) or "")


def test_a_damaged_header_is_found(tmp_path):
    data = bytearray(wal_bytes(tmp_path))
    data[12] ^= 0xFF
    assert "header checksum" in (scan_wal(bytes(data)) or "")
    assert "not a write-ahead log" in (scan_wal(b"\x00" * 64) or "")
    assert "shorter than a log header" in (scan_wal(b"\x37\x7f") or "")


@given(st.binary(max_size=2000))
def test_any_bytes_are_judged_without_raising(data):
    assert scan_wal(data) is None or isinstance(scan_wal(data), str)


def test_a_store_rolled_back_and_one_replaced_are_found_and_kept_by_set_aside(tmp_path):
    conn = store(tmp_path)
    manifest = Manifest("node")
    held = open_for_checkpoints(tmp_path / SPEC.file)
    assert advance(tmp_path, manifest, SPEC, held) is not None
    assert inspect(tmp_path, (SPEC,), manifest) == []
    manifest.stores[SPEC.file].generation += 5  # as if later checkpoints were lost
    (finding,) = inspect(tmp_path, (SPEC,), manifest)
    assert finding.problem == "rolled back" and SPEC.file in str(finding)
    assert set_aside(tmp_path, finding) == []
    manifest.stores[SPEC.file].store_id = "someone-else"
    (finding,) = inspect(tmp_path, (SPEC,), manifest)
    assert finding.problem == "replaced"
    held.close()
    conn.close()


def test_a_foreign_store_is_found_and_moved_aside_with_its_log(tmp_path):
    conn = store(tmp_path)
    conn.execute("PRAGMA user_version=7")
    manifest = Manifest("node")
    (finding,) = inspect(tmp_path, (SPEC,), manifest)
    assert finding == Finding(SPEC.file, "foreign", "schema version 7, expected 1", "what it held")
    conn.close()
    moved = set_aside(tmp_path, finding)
    assert moved and all(name.startswith(f"{SPEC.file}.lost-") for name in moved)
    assert not (tmp_path / SPEC.file).exists()


def test_without_a_manifest_a_missing_store_beside_one_with_history_is_found(tmp_path):
    conn = store(tmp_path)
    held = open_for_checkpoints(tmp_path / SPEC.file)
    advance(tmp_path, Manifest("node"), SPEC, held)
    other = StoreSpec("other.sqlite3", 1, ("t",))
    (finding,) = inspect(tmp_path, (SPEC, other), None)
    assert (finding.file, finding.problem) == ("other.sqlite3", "missing")
    held.close()
    conn.close()


def test_an_unreadable_manifest_is_a_storage_error_naming_it(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(StorageError, match="manifest"):
        Manifest.load(tmp_path)


def test_an_older_version_the_store_migrates_is_not_foreign(tmp_path):
    conn = store(tmp_path)  # version 1
    newer = StoreSpec(SPEC.file, 2, SPEC.tables, SPEC.counts, migrates_from=(1,))
    assert [f.problem for f in inspect(tmp_path, (newer,), Manifest("node"))] == []
    strict = StoreSpec(SPEC.file, 2, SPEC.tables, SPEC.counts)
    assert [f.problem for f in inspect(tmp_path, (strict,), Manifest("node"))] == ["foreign"]
    conn.close()
