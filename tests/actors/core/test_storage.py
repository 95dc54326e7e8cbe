"""open_database's schema versions: a new file, a current one, an older one migrated step by step, the rest refused."""

from __future__ import annotations

import sqlite3

import pytest

from villagemesh.actors.core.storage import open_database
from villagemesh.errors import StorageError

V1 = "CREATE TABLE t (a INTEGER)"
V3 = "CREATE TABLE t (a INTEGER, b TEXT NOT NULL DEFAULT 'x', c INTEGER NOT NULL DEFAULT 0)"
STEPS = {
    1: "ALTER TABLE t ADD COLUMN b TEXT NOT NULL DEFAULT 'x'",
    2: "ALTER TABLE t ADD COLUMN c INTEGER NOT NULL DEFAULT 0",
}


def version_1(path):
    conn = open_database(path, schema=V1, version=1)
    conn.execute("INSERT INTO t VALUES (7)")
    conn.close()


def user_version(path):
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def test_an_older_file_is_migrated_through_every_step_and_keeps_its_rows(tmp_path):
    path = tmp_path / "s.sqlite3"
    version_1(path)
    conn = open_database(path, schema=V3, version=3, migrations=STEPS)
    assert conn.execute("SELECT a, b, c FROM t").fetchall() == [(7, "x", 0)]
    conn.close()
    assert user_version(path) == 3
    open_database(path, schema=V3, version=3, migrations=STEPS).close()  # current now: used as is


def test_a_missing_step_or_a_newer_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "s.sqlite3"
    version_1(path)
    with pytest.raises(StorageError, match="schema version 1 is not the 3"):
        open_database(path, schema=V3, version=3, migrations={2: STEPS[2]})
    with pytest.raises(StorageError, match="schema version 1 is not the 3"):
        open_database(path, schema=V3, version=3)
    assert user_version(path) == 1
    newer = tmp_path / "n.sqlite3"
    open_database(newer, schema=V3, version=3).close()
    with pytest.raises(StorageError, match="schema version 3 is not the 1"):
        open_database(newer, schema=V1, version=1, migrations=STEPS)


def test_a_failing_step_rolls_the_whole_migration_back(tmp_path):
    path = tmp_path / "s.sqlite3"
    version_1(path)
    broken = {1: STEPS[1], 2: "ALTER TABLE nowhere ADD COLUMN c INTEGER"}
    with pytest.raises(StorageError, match="no such table: nowhere"):
        open_database(path, schema=V3, version=3, migrations=broken)
    assert user_version(path) == 1
    conn = sqlite3.connect(path)
    assert [row[1] for row in conn.execute("PRAGMA table_info(t)")] == ["a"]  # step 1 undone too
    conn.close()
