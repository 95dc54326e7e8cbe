"""The transfer store: rows survive a reopen (what a restart resumes from), ends are recorded."""

from __future__ import annotations

import pytest

from villagemesh.actors.transfer.store import TransferStore
from villagemesh.errors import StorageError
from villagemesh.protocols.transfer import Offer

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
