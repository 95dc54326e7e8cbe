"""The messages file's Inbox on real SQLite files: dedup across reopen, dispatch counts, expiry, kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from villagemesh.actors.core.ledger import CLOCK_SKEW_GRACE, Inbox


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def test_accept_is_true_only_the_first_time_even_after_reopen(tmp_path: Path) -> None:
    """Dedup by id survives a restart of the receiver."""
    path = tmp_path / "in.db"
    with Inbox(path) as inbox:
        assert inbox.accept(mid(1), 100.0, b"p") is True
        assert inbox.accept(mid(1), 100.0, b"p") is False
    with Inbox(path) as inbox:
        assert inbox.accept(mid(1), 100.0, b"p") is False


def test_accepted_but_unhandled_messages_are_redispatched_after_a_crash(tmp_path: Path) -> None:
    """Crash between accept and mark_handled: unhandled() lists it with its payload; marked ones are gone."""
    path = tmp_path / "in.db"
    inbox = Inbox(path)
    for n in (3, 1, 2):
        inbox.accept(mid(n), 100.0, b"p%d" % n)
    inbox.mark_handled(mid(1))
    # crash: the object is abandoned, never closed
    after = Inbox(path)
    assert after.unhandled() == [mid(3), mid(2)]  # arrival order
    assert after.payload(mid(3)) == b"p3" and after.payload(mid(1)) is None
    assert after.is_handled(mid(1)) and not after.is_handled(mid(3))
    assert after.mark_handled(mid(3)) is True and after.mark_handled(mid(3)) is False
    after.close()
    inbox.close()


def test_begin_dispatch_counts_dispatches_of_unhandled_messages_only(tmp_path: Path) -> None:
    """1 for a first dispatch, 2 for the next (the one after a death), None once handled or for an unknown id."""
    path = tmp_path / "in.db"
    with Inbox(path) as inbox:
        inbox.accept(mid(1), 100.0, b"p")
        assert inbox.begin_dispatch(mid(1)) == 1
    with Inbox(path) as inbox, Inbox(path) as gateway:  # the retrier's connection and the gateway's
        assert gateway.unfinished() == [mid(1)]
        assert gateway.begin_dispatch(mid(1)) == 2
        assert gateway.mark_handled(mid(1)) is True
        assert inbox.is_handled(mid(1)) and inbox.unhandled() == [] and gateway.unfinished() == []
        assert gateway.begin_dispatch(mid(1)) is None
        assert gateway.begin_dispatch(mid(2)) is None


def test_expire_forgets_only_handled_messages_past_ttl_and_grace(tmp_path: Path) -> None:
    """Handled + expired + grace goes; unhandled stays whatever its age."""
    with Inbox(tmp_path / "in.db") as inbox:
        inbox.accept(mid(1), 100.0, b"")
        inbox.accept(mid(2), 100.0, b"")
        inbox.accept(mid(3), 500.0, b"")
        inbox.mark_handled(mid(1))
        inbox.mark_handled(mid(3))
        assert inbox.expire(100.0 + CLOCK_SKEW_GRACE) == 0
        assert inbox.expire(101.0 + CLOCK_SKEW_GRACE) == 1
        assert inbox.unhandled() == [mid(2)] and len(inbox) == 2
        assert inbox.accept(mid(1), 100.0, b"") is True  # forgotten: the sender gave up long ago


_DISPATCHER = textwrap.dedent(
    """
    import os, sys
    from villagemesh.actors.core.ledger import Inbox

    inbox, record = Inbox(sys.argv[1]), os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    for message_id in inbox.unhandled():  # the gateway's protocol, as after a restart
        if inbox.begin_dispatch(message_id) is None:
            continue
        os.write(record, message_id.hex().encode() + b"\\n")  # the handler's effect
        inbox.mark_handled(message_id)
    """
)


@pytest.mark.slow
def test_kill_9_while_dispatching_leaves_at_most_the_message_in_progress_to_redeliver(tmp_path: Path) -> None:
    """A dispatcher killed at a random instant: restarted, only the one it was handling is dispatched again, counted."""
    path, record = tmp_path / "in.db", tmp_path / "record.txt"
    with Inbox(path) as inbox:
        for n in range(3000):
            inbox.accept(mid(n), 1e9, b"p")
    proc = subprocess.Popen([sys.executable, "-c", _DISPATCHER, str(path), str(record)])
    while not record.exists() or record.stat().st_size < 500 * 33:
        assert proc.poll() is None, "the dispatcher ended before the kill"
        threading.Event().wait(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    seen = [bytes.fromhex(h) for h in record.read_text().split()]
    with Inbox(path) as inbox:
        left = inbox.unhandled()
        counts = [inbox.begin_dispatch(m) for m in left]  # the restarted gateway's dispatches
    assert set(counts[1:]) <= {1}, "only the first unhandled message can have been dispatched before"
    if counts and counts[0] == 2 and seen and seen[-1] == left[0]:
        seen.pop()  # its handler had run before the kill: the one repeat, and it is flagged
    assert seen + left == [mid(n) for n in range(3000)]


def test_a_batch_of_received_messages_is_accepted_in_one_commit_each_id_new_once(tmp_path: Path) -> None:
    """accept_many: ids never seen come back as new (an id twice in the batch once); all survive a reopen."""
    path = tmp_path / "in.db"
    with Inbox(path) as inbox:
        inbox.accept(mid(1), 100.0, b"old")
        assert inbox.accept_many([(mid(1), 100.0, b"p"), (mid(2), 100.0, b"p2"), (mid(2), 100.0, b"p2")]) == {mid(2)}
        assert inbox.accept_many([(mid(3), 100.0, b"p3")]) == {mid(3)}
    with Inbox(path) as inbox:
        assert inbox.unhandled() == [mid(1), mid(2), mid(3)] and inbox.payload(mid(2)) == b"p2"


def test_a_dispatch_chunk_is_counted_and_marked_in_one_commit_each(tmp_path: Path) -> None:
    """begin_dispatch_many counts every unhandled id of a chunk (not the handled or unknown); mark_handled_many
    marks them; a second chunk of the same ids is refused."""
    path = tmp_path / "in.db"
    with Inbox(path) as inbox:
        for n in (1, 2, 3):
            inbox.accept(mid(n), 100.0, b"p")
        inbox.mark_handled(mid(3))
        assert inbox.begin_dispatch_many([mid(1), mid(2), mid(3), mid(9)]) == {mid(1): 1, mid(2): 1}
        assert inbox.begin_dispatch_many([mid(1)]) == {mid(1): 2}
        assert inbox.mark_handled_many([mid(1), mid(2), mid(3)]) == 2
        assert inbox.begin_dispatch_many([mid(1), mid(2)]) == {} and inbox.begin_dispatch_many([mid(2)]) == {}
        assert inbox.mark_handled_many([mid(1)]) == 0 and inbox.unhandled() == []


# -- a batch answers as its messages one at a time would ---------------------------------------------

_ops = st.lists(
    st.tuples(
        st.sampled_from(["accept", "dispatch", "handled"]),
        st.lists(st.integers(0, 700), min_size=1, max_size=600),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ops)
def test_batched_statements_answer_as_one_row_at_a_time_would(ops: list[tuple[str, list[int]]]) -> None:
    """accept_many, begin_dispatch_many and mark_handled_many (more than 256 ids at a time, repeats, unknown
    and handled ids) give what the single-message calls give, and leave the same inbox."""
    with tempfile.TemporaryDirectory() as d, Inbox(Path(d) / "batch.db") as batch, Inbox(Path(d) / "one.db") as one:
        for op, ns in ops:
            ids = [mid(n) for n in ns]
            if op == "accept":
                rows = [(i, 100.0, i * 2) for i in ids]
                assert batch.accept_many(rows) == {i for i, e, p in rows if one.accept(i, e, p)}
            elif op == "dispatch":
                want = {i: c for i in dict.fromkeys(ids) if (c := one.begin_dispatch(i)) is not None}
                assert batch.begin_dispatch_many(ids) == want
            else:
                assert batch.mark_handled_many(ids) == sum(one.mark_handled(i) for i in dict.fromkeys(ids))
        assert batch.unhandled() == one.unhandled() and batch.unfinished() == one.unfinished()
        assert len(batch) == len(one)


def test_settling_a_chunk_stores_each_report_once_and_names_the_newly_marked(tmp_path: Path) -> None:
    """settle_many: the ids it marked now (not the handled before, not the unknown), and its reports as
    outbox rows, each once, in the same commit (300 of them)."""
    path = tmp_path / "in.db"
    reports = [(mid(10_000 + n), "peer", 1, b"report", 5.0, 50.0) for n in range(300)]
    with Inbox(path) as inbox:
        inbox.accept_many([(mid(n), 100.0, b"p") for n in range(5)])
        inbox.mark_handled(mid(0))
        assert inbox.settle_many([mid(0), mid(1), mid(2), mid(2), mid(99)], reports) == {mid(1), mid(2)}
        assert inbox.settle_many([mid(3)], []) == {mid(3)} and inbox.settle_many([mid(3)], []) == set()
        assert inbox.unhandled() == [mid(4)]
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT message_id, recipient, attempts, next_attempt_at FROM outbox").fetchall()
    finally:
        conn.close()
    assert sorted(bytes(r[0]) for r in rows) == sorted(r[0] for r in reports)
    assert {(r[1], r[2], r[3]) for r in rows} == {("peer", 0, 5.0)}
