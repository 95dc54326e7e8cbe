"""The transfer store: rows survive a reopen (what a restart resumes from), ends are recorded."""

from __future__ import annotations

import sqlite3

import pytest

from villagemesh.actors.transfer.store import SCHEMA_VERSION, TransferStore
from villagemesh.errors import StorageError
from villagemesh.protocols.transfer import DigestAlgorithm, Offer

OFFER = Offer(bytes(16), 1_000_000, 1024, bytes(32), "model", "w.bin")


def test_outgoing_rows_and_their_acks_survive_a_reopen(tmp_path):
    store = TransferStore(tmp_path / "t.sqlite3")
    store.add_outgoing(OFFER, "p" * 32, "/data/w.bin", False)
    store.set_outgoing([(OFFER.transfer_id, 7, "sending", "")])
    store.close()
    store = TransferStore(tmp_path / "t.sqlite3")
    (row,) = store.outgoing()
    assert (row.offer, row.peer_id, row.path, row.spooled, row.acked, row.state) == (
        OFFER,
        "p" * 32,
        "/data/w.bin",
        False,
        7,
        "sending",
    )
    store.close()


def test_committed_chunks_survive_a_reopen_and_an_end_forgets_them(tmp_path):
    store = TransferStore(tmp_path / "t.sqlite3")
    store.add_incoming(OFFER, "p" * 32, "/d/x.part", "/d/received/w.bin")
    store.commit_chunks([(OFFER.transfer_id, i) for i in (0, 1, 2, 5)])
    store.commit_chunks([(OFFER.transfer_id, 2)])  # a duplicate commit is harmless
    store.close()
    store = TransferStore(tmp_path / "t.sqlite3")
    (row,) = store.incoming()
    assert row.committed == frozenset({0, 1, 2, 5}) and row.state == "receiving"
    store.commit_chunks((), [(OFFER.transfer_id, "done", "")])
    (row,) = store.incoming()
    assert row.committed == frozenset() and row.state == "done"
    store.close()
    store.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        store.outgoing()


VERSION_1 = """
CREATE TABLE outgoing (transfer_id BLOB PRIMARY KEY, peer_id TEXT NOT NULL, path TEXT NOT NULL,
    size INTEGER NOT NULL, chunk_size INTEGER NOT NULL, digest BLOB NOT NULL, kind TEXT NOT NULL,
    name TEXT NOT NULL, spooled INTEGER NOT NULL, acked INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '');
CREATE TABLE incoming (transfer_id BLOB PRIMARY KEY, peer_id TEXT NOT NULL, size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL, digest BLOB NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    partial TEXT NOT NULL, final TEXT NOT NULL, state TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');
CREATE TABLE chunks (transfer_id BLOB NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY (transfer_id, idx)) WITHOUT ROWID;
INSERT INTO outgoing VALUES (x'01010101010101010101010101010101', 'p', '/w.bin', 10, 256, zeroblob(32), 'k', 'w',
    0, 0, 'sending', '');
INSERT INTO incoming VALUES (x'02020202020202020202020202020202', 'q', 600, 256, zeroblob(32), 'k', 'v',
    '/t/v.part', '/r/v', 'receiving', '');
INSERT INTO chunks VALUES (x'02020202020202020202020202020202', 1);
PRAGMA user_version=1;
"""


def test_a_version_1_file_is_migrated_and_its_transfers_keep_blake2b(tmp_path):
    path = tmp_path / "t.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(VERSION_1)
    conn.close()
    store = TransferStore(path)
    (out,), (inc,) = store.outgoing(), store.incoming()
    blake = DigestAlgorithm.BLAKE2B_256
    assert (out.offer.transfer_id, out.state, out.offer.algorithm) == (b"\x01" * 16, "sending", blake)
    assert (inc.offer.size, inc.committed, inc.offer.algorithm) == (600, frozenset({1}), blake)
    sha = Offer(b"\x03" * 16, 5, 256, bytes(32), "k", "n", DigestAlgorithm.SHA_256)
    store.add_incoming(sha, "q", "/t/n.part", "/r/n")
    store.close()
    store = TransferStore(path)
    assert [r.offer.algorithm for r in store.incoming()] == [DigestAlgorithm.BLAKE2B_256, DigestAlgorithm.SHA_256]
    store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    conn.close()


def test_a_newer_or_unknown_version_is_refused_not_migrated(tmp_path):
    for version in (3, 99):
        path = tmp_path / f"v{version}.sqlite3"
        conn = sqlite3.connect(path)
        conn.execute(f"PRAGMA user_version={version}")
        conn.close()
        with pytest.raises(StorageError, match=f"schema version {version} is not the 2"):
            TransferStore(path)
