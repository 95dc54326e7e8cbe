"""The outbox on real SQLite files, and the crash windows of the whole protocol (outbox and inbox) end to end."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from villagemesh.actors.core.ledger import Inbox, prepare
from villagemesh.actors.retrier.modes import NetworkMode
from villagemesh.actors.retrier.policy import RetryPolicy
from villagemesh.actors.retrier.state import (
    AckReceived,
    AttemptResult,
    Backoff,
    Delivered,
    Enqueue,
    Failed,
    FailReason,
    RetrierState,
    Routes,
    Send,
    Tick,
)
from villagemesh.actors.retrier.store import Outbox, OutboxRow
from villagemesh.errors import ConfigError, StorageError
from villagemesh.protocols.envelope import Priority


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def put(outbox: Outbox, n: int, *, prio: Priority = Priority.NORMAL, created: float = 0.0) -> bool:
    return outbox.put(mid(n), "bob", prio, b"payload-%d" % n, created_at=created, expires_at=created + 100.0)


# --- outbox ------------------------------------------------------------------------------------


def test_put_is_persistent_and_idempotent(tmp_path: Path) -> None:
    """A put survives reopen; putting the same id again changes nothing and says so."""
    path = tmp_path / "out.db"
    with Outbox(path) as outbox:
        assert put(outbox, 1) is True
        assert put(outbox, 1) is False
    with Outbox(path) as outbox:
        assert outbox.pending() == [OutboxRow(mid(1), "bob", Priority.NORMAL, 0.0, 100.0, 0, 0.0, None, ())]
        assert outbox.payload(mid(1)) == b"payload-1"
        assert len(outbox) == 1


def test_decisions_are_persisted_in_one_transaction(tmp_path: Path) -> None:
    """Send stores attempts and deadline; Backoff the error and failed transports; Delivered/Failed delete."""
    path = tmp_path / "out.db"
    with Outbox(path) as outbox:
        for n in (1, 2, 3):
            put(outbox, n)
        outbox.apply(
            [
                Send(mid(1), "bob", "libp2p", 1, 30.0),
                Backoff(mid(2), 2, 45.0, "libp2p: refused", ("libp2p", "bitchat")),
                Delivered(mid(3), 1, "libp2p"),
            ]
        )
    with Outbox(path) as outbox:
        one, two = outbox.pending()
        assert (one.attempts, one.next_attempt_at) == (1, 30.0)
        assert (two.attempts, two.next_attempt_at, two.last_error, two.failed) == (
            2,
            45.0,
            "libp2p: refused",
            ("libp2p", "bitchat"),
        )
        outbox.apply([Failed(mid(1), 5, "x", FailReason.TTL_EXPIRED)])
        assert [r.message_id for r in outbox.pending()] == [mid(2)]
        assert outbox.delete(mid(2)) and not outbox.delete(mid(2))
        assert outbox.get(mid(2)) is None and outbox.payload(mid(2)) is None


def test_a_message_is_stored_with_its_first_send_in_one_commit(tmp_path: Path) -> None:
    """put(send=...) stores the attempt and its deadline with the row; a Send for another id is refused."""
    path = tmp_path / "out.db"
    with Outbox(path) as outbox:
        send = Send(mid(1), "bob", "libp2p", 1, 30.0)
        assert outbox.put(mid(1), "bob", Priority.HIGH, b"e", created_at=0.0, expires_at=100.0, send=send)
        assert not outbox.put(mid(1), "bob", Priority.HIGH, b"e", created_at=0.0, expires_at=100.0, send=send)
        with pytest.raises(ConfigError, match=mid(1).hex()):
            outbox.put(mid(2), "bob", Priority.HIGH, b"e", created_at=0.0, expires_at=100.0, send=send)
        assert (
            outbox.put_many(
                [(mid(3), "bob", Priority.LOW, b"f", 0.0, 100.0), (mid(1), "x", Priority.LOW, b"", 0.0, 1.0)]
            )
            == 1
        )
        outbox.apply([Delivered(mid(3), 1, "libp2p")])  # one row: one statement, no BEGIN/COMMIT
    with Outbox(path) as outbox:  # as after a kill: the row says attempt 1 was sent, retry at its deadline
        assert outbox.pending() == [OutboxRow(mid(1), "bob", Priority.HIGH, 0.0, 100.0, 1, 30.0, None, ())]


def test_restored_rows_continue_in_a_fresh_state(tmp_path: Path) -> None:
    """After a crash, replaying pending() gives each message its stored attempt count."""
    path = tmp_path / "out.db"
    outbox = Outbox(path)
    put(outbox, 1)
    state = RetrierState(mode=NetworkMode.HYBRID)
    state.step(Routes("bob", ("libp2p", "websocket"), now=0.0))
    outbox.apply(state.step(outbox.pending()[0].to_enqueue(now=0.0)))
    # the process dies here: no close
    restarted = Outbox(path)
    state = RetrierState(mode=NetworkMode.HYBRID, ack_timeout=30.0)
    state.step(Routes("bob", ("libp2p", "websocket"), now=31.0))
    out = []
    for row in restarted.pending():
        out += state.step(row.to_enqueue(now=31.0))
    sends = [d for d in out if isinstance(d, Send)]
    assert [(s.attempt, s.message_id) for s in sends] == [(2, mid(1))]
    restarted.close()
    outbox.close()


def test_invalid_ids_and_priorities_are_refused(tmp_path: Path) -> None:
    """A 15-byte id or an int priority is a ConfigError naming it."""
    with Outbox(tmp_path / "out.db") as outbox:
        with pytest.raises(ConfigError, match="16 bytes"):
            outbox.put(b"short", "bob", Priority.LOW, b"", created_at=0.0, expires_at=1.0)
        with pytest.raises(ConfigError, match="Priority"):
            outbox.put(mid(1), "bob", 3, b"", created_at=0.0, expires_at=1.0)  # type: ignore[arg-type]


def test_corrupt_row_is_a_storage_error(tmp_path: Path) -> None:
    """A row with an unknown priority is reported with its id, not half-loaded."""
    path = tmp_path / "out.db"
    with Outbox(path) as outbox:
        put(outbox, 1)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE outbox SET priority = 42")
    conn.commit()
    conn.close()
    with Outbox(path) as outbox, pytest.raises(StorageError, match=mid(1).hex()):
        outbox.pending()


def test_closed_outbox_refuses_use(tmp_path: Path) -> None:
    """Use after close is a StorageError naming the outbox."""
    outbox = Outbox(tmp_path / "out.db")
    outbox.close()
    with pytest.raises(StorageError, match="outbox is closed"):
        outbox.pending()


def test_a_prepared_file_is_opened_by_several_threads_at_once_without_a_lock_error(tmp_path: Path) -> None:
    """prepare() first (as Node.start does); then the retrier's two stores and the gateway's open it together."""
    errors: list[str] = []

    def open_close(cls: type[Inbox] | type[Outbox], path: Path) -> None:
        try:
            cls(path).close()
        except StorageError as exc:
            errors.append(str(exc))

    for n in range(100):
        path = tmp_path / f"{n}.db"
        prepare(path)
        threads = [threading.Thread(target=open_close, args=(cls, path)) for cls in (Outbox, Inbox, Inbox)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []


def test_outbox_and_inbox_can_share_one_file(tmp_path: Path) -> None:
    """One schema holds both tables."""
    path = tmp_path / "delivery.db"
    with Outbox(path) as outbox, Inbox(path) as inbox:
        put(outbox, 1)
        inbox.accept(mid(2), 1.0, b"")
        assert len(outbox) == 1 and len(inbox) == 1


# --- crash windows, end to end ----------------------------------------------------------------


class Receiver:
    """A receiving node: inbox dedup, ack after accept, handler log kept outside the process."""

    def __init__(self, path: Path, handled: list[bytes]) -> None:
        self.path = path
        self.handled = handled
        self.inbox = Inbox(path)
        for message_id in self.inbox.unhandled():  # restart: re-dispatch
            self.dispatch(message_id)

    def receive(self, message_id: bytes) -> bool:
        """Returns whether an ack goes back."""
        if self.inbox.accept(message_id, 1e9, b"payload"):
            self.dispatch(message_id)
        return True

    def dispatch(self, message_id: bytes) -> None:
        self.handled.append(message_id)
        self.inbox.mark_handled(message_id)


@pytest.mark.parametrize("crash_after", ["put", "send_decision", "transport_send", "receiver_accept", "ack"])
def test_every_message_is_handled_exactly_once_whichever_step_the_sender_dies_after(
    tmp_path: Path, crash_after: str
) -> None:
    """Sender dies (store abandoned, state lost) after each commit point; after restart all 20 arrive once."""
    handled: list[bytes] = []
    receiver = Receiver(tmp_path / "in.db", handled)
    ids = [mid(n) for n in range(20)]

    def new_sender() -> tuple[Outbox, RetrierState]:
        outbox = Outbox(tmp_path / "out.db")
        state = RetrierState(policy=RetryPolicy(max_attempts=5), ack_timeout=5.0, max_in_flight=8)
        outbox.apply(state.step(Routes("bob", ("libp2p",), now=0.0)))
        for row in outbox.pending():
            outbox.apply(state.step(row.to_enqueue(now=0.0)))
        return outbox, state

    outbox, state = new_sender()
    pending_sends: list[Send] = []
    for n, message_id in enumerate(ids):
        outbox.put(message_id, "bob", Priority(n % 5), b"payload", created_at=0.0, expires_at=1e9)
        if crash_after == "put":
            continue
        decisions = state.step(Enqueue(message_id, "bob", Priority(n % 5), expires_at=1e9, now=0.0))
        outbox.apply(decisions)
        pending_sends += [d for d in decisions if isinstance(d, Send)]
    if crash_after in ("transport_send", "receiver_accept", "ack"):
        for send in pending_sends:
            if crash_after != "transport_send":
                acked = receiver.receive(send.message_id)
                if crash_after == "ack" and acked:
                    outbox.apply(state.step(AckReceived(send.message_id, now=1.0)))
    # crash: abandon the sender's outbox and state; restart it and run to completion
    outbox, state = new_sender()
    now = 0.0
    queue = [d for d in state.step(Tick(now)) if isinstance(d, Send)]
    for _ in range(1000):
        if not len(state):
            break
        while queue:
            send = queue.pop(0)
            if receiver.receive(send.message_id):
                decisions = state.step(AckReceived(send.message_id, now=now))
                outbox.apply(decisions)
                queue += [d for d in decisions if isinstance(d, Send)]
        now += 10.0
        decisions = state.step(Tick(now))
        outbox.apply(decisions)
        queue += [d for d in decisions if isinstance(d, Send)]
    assert len(outbox) == 0
    assert sorted(handled) == ids  # each exactly once


def test_receiver_dying_between_accept_and_handling_still_handles_once(tmp_path: Path) -> None:
    """Accepted (and acked), then the receiver dies before dispatch: the restart dispatches it once."""
    handled: list[bytes] = []
    inbox = Inbox(tmp_path / "in.db")
    assert inbox.accept(mid(7), 1e9, b"payload")
    # dies before dispatch; the sender had its ack and deleted the message; a late duplicate arrives too
    restarted = Receiver(tmp_path / "in.db", handled)
    restarted.receive(mid(7))
    assert handled == [mid(7)]
    inbox.close()


# --- a real kill -9 ----------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import sys
    from villagemesh.actors.retrier.store import Outbox
    from villagemesh.actors.retrier.state import Send
    from villagemesh.protocols.envelope import Priority

    outbox = Outbox(sys.argv[1])
    count = int(sys.argv[2])
    for n in range(count):
        outbox.put(n.to_bytes(16, "big"), "bob", Priority(n % 5), b"envelope-%d" % n, created_at=0.0, expires_at=1e9)
        print(n, flush=True)
    deadline = 1e6
    while True:  # keep every message "in flight": attempt 1's deadline rewritten until killed
        deadline += 1.0
        outbox.apply([Send(n.to_bytes(16, "big"), "bob", "libp2p", 1, deadline) for n in range(count)])
        if deadline == 1e6 + 1.0:
            print("ready", flush=True)
    """
)


def _spawn_writer(path: Path, count: int) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(count)], stdout=subprocess.PIPE, text=True, env=env
    )


@pytest.mark.slow
def test_kill_9_with_1000_messages_in_flight_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """A writer holding 1,000 in-flight messages is SIGKILLed mid-update; reopened, all 1,000 are there once."""
    path = tmp_path / "out.db"
    proc = _spawn_writer(path, 1000)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "ready":
            break
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    with Outbox(path) as outbox:
        rows = outbox.pending()
        assert [r.message_id for r in rows] == [mid(n) for n in range(1000)]
        # one transaction rewrites all 1,000 rows: after the kill they agree (all old or all new)
        assert len({(r.attempts, r.next_attempt_at) for r in rows}) == 1
        assert rows[0].attempts == 1 and rows[0].next_attempt_at > 1e6
        assert all(outbox.payload(mid(n)) == b"envelope-%d" % n for n in range(1000))


@pytest.mark.slow
def test_kill_9_while_writing_keeps_every_committed_message(tmp_path: Path) -> None:
    """Killed after the 500th confirmed put: every confirmed id is present, nothing twice, nothing torn."""
    path = tmp_path / "out.db"
    proc = _spawn_writer(path, 1000)
    assert proc.stdout is not None
    confirmed = [int(next(proc.stdout)) for _ in range(500)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    with Outbox(path) as outbox:
        ids = [r.message_id for r in outbox.pending()]
        assert len(ids) == len(set(ids)) >= 500
        assert set(ids) >= {mid(n) for n in confirmed}
        assert all(outbox.payload(i) == b"envelope-%d" % int.from_bytes(i, "big") for i in ids)


@pytest.mark.slow
def test_sender_killed_mid_flight_delivers_all_1000_exactly_once_after_restart(tmp_path: Path) -> None:
    """kill -9 of a sender with 1,000 messages in flight (some already received); restart → each handled once."""
    out_path, in_path = tmp_path / "out.db", tmp_path / "in.db"
    proc = _spawn_writer(out_path, 1000)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "ready":
            break
    handled: list[bytes] = []
    receiver = Receiver(in_path, handled)
    for n in range(0, 1000, 3):  # a third had reached the receiver before the kill; their acks were lost
        receiver.receive(mid(n))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    outbox = Outbox(out_path)
    state = RetrierState(ack_timeout=5.0, max_in_flight=1000)
    state.step(Routes("bob", ("libp2p",), now=2e6))
    sends: list[Send] = []
    for row in outbox.pending():
        decisions = state.step(row.to_enqueue(now=2e6))
        outbox.apply(decisions)
        sends += [d for d in decisions if isinstance(d, Send)]
    assert len(sends) == 1000
    for send in sends:
        if receiver.receive(send.message_id):
            outbox.apply(state.step(AttemptResult(send.message_id, send.attempt, send.transport, None, now=2e6)))
            outbox.apply(state.step(AckReceived(send.message_id, now=2e6)))
    assert len(outbox) == 0 and len(state) == 0
    assert sorted(handled) == [mid(n) for n in range(1000)]
    outbox.close()


# --- randomised faults, real files ---------------------------------------------------------------


class Simulation:
    """Sender (Outbox + RetrierState) and receiver (Inbox) joined by a lossy, reordering network."""

    def __init__(self, root: Path, count: int) -> None:
        self.root = root
        self.ids = [mid(n) for n in range(count)]
        self.handled: list[bytes] = []
        self.network: list[tuple[str, bytes]] = []
        self.now = 0.0
        self.outbox = Outbox(root / "out.db")
        for n, message_id in enumerate(self.ids):
            self.outbox.put(message_id, "bob", Priority(n % 5), b"p", created_at=0.0, expires_at=1e12)
        self.state = self._restore()
        self.inbox = Inbox(root / "in.db")

    def _restore(self) -> RetrierState:
        state = RetrierState(policy=RetryPolicy(max_attempts=1000, backoff_max=4.0), ack_timeout=3.0, max_in_flight=3)
        self._act(state, Routes("bob", ("libp2p", "websocket"), now=self.now))
        for row in self.outbox.pending():
            self._act(state, row.to_enqueue(now=self.now))
        return state

    def _act(self, state: RetrierState, event: object) -> None:
        decisions = state.step(event)  # type: ignore[arg-type]
        self.outbox.apply(decisions)  # persisted before acting, as the actor does
        self.network += [("msg", d.message_id) for d in decisions if isinstance(d, Send)]

    def tick(self, dt: float) -> None:
        self.now += dt
        self._act(self.state, Tick(self.now))

    def deliver(self, index: int, *, receiver_dies_before_dispatch: bool = False) -> None:
        kind, message_id = self.network.pop(index % len(self.network))
        if kind == "ack":
            self._act(self.state, AckReceived(message_id, now=self.now))
            return
        if not self.inbox.accept(message_id, 1e12, b"p"):
            self.network.append(("ack", message_id))  # duplicate: ack again, do not dispatch
            return
        if receiver_dies_before_dispatch:
            self.crash_receiver()
            return
        self.network.append(("ack", message_id))
        self.handled.append(message_id)
        self.inbox.mark_handled(message_id)

    def crash_sender(self) -> None:
        self.outbox = Outbox(self.root / "out.db")  # the old connection is abandoned, not closed
        self.state = self._restore()

    def crash_receiver(self) -> None:
        self.inbox = Inbox(self.root / "in.db")
        for message_id in self.inbox.unhandled():
            self.handled.append(message_id)
            self.inbox.mark_handled(message_id)

    def drain(self) -> None:
        for _ in range(10_000):
            if not len(self.state) and not self.network:
                return
            while self.network:
                self.deliver(0)
            self.tick(5.0)
        raise AssertionError("the simulation did not settle")


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("deliver"), st.integers(0, 50), st.booleans()),
            st.tuples(st.just("drop"), st.integers(0, 50), st.just(False)),
            st.tuples(st.just("tick"), st.integers(0, 6), st.just(False)),
            st.tuples(st.just("crash_sender"), st.just(0), st.just(False)),
            st.tuples(st.just("crash_receiver"), st.just(0), st.just(False)),
        ),
        max_size=60,
    )
)
def test_any_interleaving_of_loss_reordering_and_crashes_handles_each_message_once(
    script: list[tuple[str, int, bool]],
) -> None:
    """Lost and reordered envelopes and acks, kill of either side at any step: each id handled exactly once."""
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        sim = Simulation(Path(root), 6)
        for action, number, flag in script:
            if action == "deliver" and sim.network:
                sim.deliver(number, receiver_dies_before_dispatch=flag)
            elif action == "drop" and sim.network:
                sim.network.pop(number % len(sim.network))
            elif action == "tick":
                sim.tick(float(number))
            elif action == "crash_sender":
                sim.crash_sender()
            elif action == "crash_receiver":
                sim.crash_receiver()
        sim.drain()
        assert sorted(sim.handled) == sim.ids
        assert len(sim.outbox) == 0 and sim.inbox.unhandled() == []


def test_a_group_of_new_messages_and_the_turns_decisions_are_one_commit(tmp_path: Path) -> None:
    """put_batch stores each row (with its first Send counted) and the other decisions together; an id
    already stored refuses the whole batch, storing none of it."""
    path = tmp_path / "out.db"
    with Outbox(path) as outbox:
        put(outbox, 9)
        first = Send(mid(1), "bob", "libp2p", 1, 30.0)
        outbox.put_batch(
            [
                (mid(1), "bob", Priority.HIGH, b"e1", 0.0, 100.0, first),
                (mid(2), "bob", Priority.LOW, b"e2", 0.0, 100.0, None),
            ],
            [first, Failed(mid(9), 0, "ttl expired", FailReason.TTL_EXPIRED)],
        )
        with pytest.raises(StorageError, match="1 of 2 new message"):
            outbox.put_batch(
                [
                    (mid(3), "bob", Priority.LOW, b"e3", 0.0, 100.0, None),
                    (mid(2), "x", Priority.LOW, b"", 0.0, 1.0, None),
                ]
            )
    with Outbox(path) as outbox:
        rows = {row.message_id: row for row in outbox.pending()}
        assert set(rows) == {mid(1), mid(2)}
        assert (rows[mid(1)].attempts, rows[mid(1)].next_attempt_at) == (1, 30.0)
        assert rows[mid(2)].attempts == 0 and outbox.payload(mid(2)) == b"e2"


def test_decisions_are_persisted_in_their_order_a_backoff_then_a_send_of_one_message(tmp_path: Path) -> None:
    """A failover's Backoff and the Send that follows it in the same turn: the row ends with the Send's count."""
    path = tmp_path / "out.db"
    with Outbox(path) as outbox:
        put(outbox, 1)
        outbox.apply(
            [Backoff(mid(1), 1, 5.0, "libp2p: refused", ("libp2p",)), Send(mid(1), "bob", "websocket", 2, 40.0)]
        )
        row = outbox.get(mid(1))
        assert row is not None and (row.attempts, row.next_attempt_at, row.failed) == (2, 40.0, ("libp2p",))
