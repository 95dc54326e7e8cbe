"""The application gateway: subscribers (threads and asyncio), handles, and failing handlers."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WAIT
from villagemesh.actors.app.actor import MAX_DISPATCHES, AppActor
from villagemesh.actors.app.state import DeliveryState, HandleTable, Subscribers
from villagemesh.actors.core.base import ActorContext
from villagemesh.actors.core.ledger import Inbox
from villagemesh.actors.retrier.messages import Incoming, IncomingMany, MessageFailed, MessagesDelivered
from villagemesh.errors import ConfigError, DeliveryFailed, Unconfirmed
from villagemesh.protocols.envelope import Message, Priority, encode_message
from villagemesh.supervision.spec import ChildSpec, SupervisorSpec
from villagemesh.supervision.supervisor import Supervisor


def envelope(kind: str = "DATA", payload: bytes = b"hi") -> tuple[bytes, bytes]:
    mid = os.urandom(16)
    msg = Message(mid, kind, "a" * 32, "b" * 32, Priority.NORMAL, 1000.0, 60.0, None, payload)
    return mid, encode_message(msg)


class Gateway:
    """An app gateway on a real inbox file, fed Incoming as the retrier would (accepted first)."""

    def __init__(
        self, runtime: Any, path: Path, subscribers: Subscribers, handles: HandleTable | None = None, **extra: Any
    ) -> None:
        config = {
            "subscribers": subscribers,
            "handles": HandleTable() if handles is None else handles,
            "inbox": str(path),
            **extra,
        }
        self.inbox = Inbox(path)  # the retrier's connection, in the test's thread; the file exists first, as in a node
        runtime.bus.open_mailbox("app")  # as the supervisor does; tells made before the actor runs wait there
        Supervisor.launch(SupervisorSpec("root", [ChildSpec("app", AppActor, config=config)]), runtime)
        self.client = runtime.bus.client()

    def incoming(self, mid: bytes, env: bytes, *, accept: bool = True) -> None:
        if accept:
            self.inbox.accept(mid, 2000.0, env)
        self.client.tell("app", Incoming(mid, env))

    def wait_handled(self, mid: bytes) -> bool:
        """True once the gateway's mark for ``mid`` is committed (polls the file: it has no notification)."""
        deadline = time.monotonic() + WAIT
        while not self.inbox.is_handled(mid):
            if time.monotonic() >= deadline:
                return False
            threading.Event().wait(0.005)
        return True

    async def await_handled(self, mid: bytes) -> bool:
        """:meth:`wait_handled` from inside the loop the handlers run on (which must keep running)."""
        deadline = time.monotonic() + WAIT
        while not self.inbox.is_handled(mid):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True


def test_inbound_messages_reach_their_kind_and_wildcard_subscribers_then_are_marked_handled(runtime, tmp_path):
    """DATA goes to DATA and '*' handlers, not to HEARTBEAT handlers, as a first dispatch; then it is marked."""
    subs, seen = Subscribers(), []
    subs.add("DATA", lambda m: seen.append(("data", m.payload, m.redelivered)))
    subs.add("*", lambda m: seen.append(("any", m.payload, m.redelivered)))
    subs.add("HEARTBEAT", lambda m: seen.append(("hb", m.payload, m.redelivered)))
    app = Gateway(runtime, tmp_path / "in.db", subs)
    mid, env = envelope()
    app.incoming(mid, env)
    assert app.wait_handled(mid)
    assert seen == [("data", b"hi", False), ("any", b"hi", False)]
    assert app.inbox.unhandled() == []


def test_an_incoming_many_dispatches_each_of_its_messages_once_in_order(runtime, recorder, tmp_path):
    """A turn's IncomingMany (an id twice, and one handled already, among them) reaches the handlers
    once per new message, in its order, and every one is marked handled."""
    subs, seen = Subscribers(), []
    subs.add("DATA", lambda m: seen.append(m.payload))
    app = Gateway(runtime, tmp_path / "in.db", subs)
    done_id, done_env = envelope(payload=b"before")
    app.incoming(done_id, done_env)
    assert app.wait_handled(done_id)
    batch = [envelope(payload=str(i).encode()) for i in range(40)]
    for mid, env in batch:
        app.inbox.accept(mid, 2000.0, env)
    ids = (*(m for m, _ in batch), batch[0][0], done_id)
    envs = (*(e for _, e in batch), batch[0][1], done_env)
    app.client.tell("app", IncomingMany(ids, envs))
    assert all(app.wait_handled(mid) for mid, _ in batch)
    recorder.wait_for("message_already_handled", message_id=done_id.hex())
    assert seen == [b"before"] + [str(i).encode() for i in range(40)]
    assert list(IncomingMany(ids[:2], envs[:2])) == [Incoming(ids[0], envs[0]), Incoming(ids[1], envs[1])]


def test_an_id_twice_in_one_dispatch_chunk_reaches_the_handlers_once(runtime, recorder, tmp_path):
    """A redispatched Incoming can wait in the gateway's mailbox beside the IncomingMany that first
    handed the same message over (a restarted retrier hands every unhandled message over again), so
    one chunk can hold an id twice: its handlers run once. (They ran twice while the two copies fell
    in one chunk: the dispatch count is one UPDATE per id, whatever the copies.)"""
    subs, seen = Subscribers(), []
    subs.add("DATA", lambda m: seen.append(m.payload))
    app = Gateway(runtime, tmp_path / "in.db", subs)
    warm_id, warm_env = envelope(payload=b"warm")
    app.incoming(warm_id, warm_env)  # times a handler: the next chunks hold many messages
    assert app.wait_handled(warm_id)
    (a, a_env), (b, b_env) = envelope(payload=b"a"), envelope(payload=b"b")
    for mid, env in ((a, a_env), (b, b_env)):
        app.inbox.accept(mid, 2000.0, env)
    app.client.tell_many("app", [IncomingMany((a, b), (a_env, b_env)), Incoming(a, a_env)])
    assert app.wait_handled(a) and app.wait_handled(b)
    recorder.wait_for("message_already_handled", message_id=a.hex())
    assert seen == [b"warm", b"a", b"b"]


def test_a_handled_message_is_never_dispatched_again(runtime, recorder, tmp_path):
    """A second Incoming for a handled id (a restarted retrier re-sends what it saw unhandled) reaches no handler."""
    subs, seen = Subscribers(), []
    subs.add("DATA", lambda m: seen.append(m.payload))
    app = Gateway(runtime, tmp_path / "in.db", subs)
    mid, env = envelope()
    app.incoming(mid, env)
    app.incoming(mid, env, accept=False)
    recorder.wait_for("message_already_handled", message_id=mid.hex())
    assert seen == [b"hi"]


def test_a_message_whose_dispatch_began_before_a_death_comes_back_flagged_redelivered(runtime, recorder, tmp_path):
    """Dispatch began (committed) and the process died before the mark: the next dispatch says redelivered."""
    subs, seen = Subscribers(), []
    subs.add("DATA", lambda m: seen.append((m.payload, m.redelivered)))
    app = Gateway(runtime, tmp_path / "in.db", subs)
    mid, env = envelope()
    app.inbox.accept(mid, 2000.0, env)
    assert app.inbox.begin_dispatch(mid) == 1  # the gateway that died had got this far
    app.incoming(mid, env, accept=False)
    assert app.wait_handled(mid)
    assert seen == [(b"hi", True)]
    assert recorder.matching("message_redelivered") == [
        {**recorder.matching("message_redelivered")[0], "message_id": mid.hex(), "dispatches": 2}
    ]


class Dies(BaseException):
    """Not an application error the gateway logs and survives: it ends the gateway instance."""


def test_a_gateway_that_dies_while_a_handler_runs_dispatches_that_message_again_flagged(runtime, recorder, tmp_path):
    """The instance dies mid-handler; its successor re-dispatches the unfinished message at start, redelivered."""
    subs, seen = Subscribers(), []

    def handler(message):
        seen.append((message.payload, message.redelivered))
        if not message.redelivered:
            raise Dies("the process would have died here")

    subs.add("DATA", handler)
    app = Gateway(runtime, tmp_path / "in.db", subs)
    mid, env = envelope()
    app.incoming(mid, env)
    recorder.wait_for("child_restarted", child_id="app")
    assert app.wait_handled(mid)
    assert seen == [(b"hi", False), (b"hi", True)]
    assert app.inbox.unfinished() == []


def test_a_failing_handler_is_logged_and_the_others_still_run(runtime, recorder, tmp_path):
    """An application exception is logged with its traceback; the gateway does not crash; the message is handled."""
    subs, seen = Subscribers(), []

    def bad(message):
        raise ValueError("application bug")

    subs.add("DATA", bad)
    subs.add("DATA", lambda m: seen.append(m.payload))
    app = Gateway(runtime, tmp_path / "in.db", subs)
    mid, env = envelope()
    app.incoming(mid, env)
    failed = recorder.wait_for("handler_failed")[0]
    assert failed["exc_type"] == "ValueError" and "application bug" in failed["traceback"]
    assert app.wait_handled(mid) and seen == [b"hi"]
    assert recorder.matching("child_crashed") == []


def test_a_garbage_envelope_is_rejected_and_still_marked_handled(runtime, recorder, tmp_path):
    """Bytes that are not an envelope are logged and never dispatched; they are not dispatched again either."""
    app = Gateway(runtime, tmp_path / "in.db", Subscribers())
    app.incoming(b"x" * 16, b"\x07garbage")
    recorder.wait_for("message_rejected", actor="app")
    assert app.wait_handled(b"x" * 16)


def test_coroutine_handlers_run_on_their_loop_and_the_mark_waits_for_them(runtime, tmp_path):
    """An async handler subscribed inside asyncio runs on that loop; the message is handled when it returns."""
    subs = Subscribers()
    app = Gateway(runtime, tmp_path / "in.db", subs)

    async def main() -> tuple[int, int]:
        started: asyncio.Queue[int] = asyncio.Queue()
        release = asyncio.Event()

        async def handler(message):
            await started.put(threading.get_ident())
            await release.wait()

        subs.add("DATA", handler)
        mid, env = envelope()
        app.incoming(mid, env)
        handler_thread = await asyncio.wait_for(started.get(), WAIT)
        app.incoming(mid, env, accept=False)  # while it runs: not dispatched again
        assert not app.inbox.is_handled(mid)  # the handler has not returned
        release.set()
        assert await app.await_handled(mid)
        assert started.empty()
        return handler_thread, threading.get_ident()

    handler_thread, loop_thread = asyncio.run(main())
    assert handler_thread == loop_thread


def test_a_failing_coroutine_handler_is_logged_and_the_message_still_handled(runtime, recorder, tmp_path):
    """An async handler's exception is logged like a plain one's."""
    subs = Subscribers()
    app = Gateway(runtime, tmp_path / "in.db", subs)

    async def main() -> bytes:
        async def handler(message):
            raise KeyError("async application bug")

        subs.add("DATA", handler)
        mid, env = envelope()
        app.incoming(mid, env)
        assert await app.await_handled(mid)
        return mid

    asyncio.run(main())
    failed = recorder.wait_for("handler_failed")[0]
    assert failed["exc_type"] == "KeyError" and "async application bug" in failed["traceback"]


def test_the_gateway_needs_its_inbox_file(runtime):
    """No inbox path: refused when the actor is made, naming the value."""
    runtime.bus.open_mailbox("app")
    with pytest.raises(ConfigError, match="inbox"):
        AppActor(
            ActorContext(
                runtime.bus,
                "app",
                runtime.log,
                runtime.scheduler,
                config={"subscribers": Subscribers(), "handles": HandleTable()},
            )
        )


def test_delivery_updates_resolve_handles_for_waiters_callbacks_and_awaiters(runtime, tmp_path):
    """A handle ends delivered or failed; wait, result, callbacks and await all see it."""
    handles = HandleTable()
    Gateway(runtime, tmp_path / "in.db", Subscribers(), handles)
    ok, bad = handles.new(b"1" * 16), handles.new(b"2" * 16)
    called = []
    ok.add_done_callback(called.append)
    client = runtime.bus.client()
    client.tell("app", MessagesDelivered((b"1" * 16,), (1,), ("websocket",)))
    client.tell("app", MessageFailed(b"2" * 16, 5, "connection refused", "attempts_exhausted"))
    assert ok.wait(WAIT).state is DeliveryState.DELIVERED and ok.result(WAIT).delivered
    with pytest.raises(DeliveryFailed) as info:
        bad.result(WAIT)
    assert info.value.attempts == 5 and "refused" in info.value.last_error
    assert called and called[0].delivered
    late = []
    ok.add_done_callback(late.append)
    assert late[0].delivered

    async def awaited():
        h = handles.new(b"3" * 16)
        await asyncio.to_thread(client.tell, "app", MessagesDelivered((b"3" * 16,), (2,), ("websocket",)))
        return await asyncio.wait_for(h, WAIT)

    assert asyncio.run(awaited()).attempts == 2
    assert len(handles) == 0


def test_an_acked_send_whose_outcome_never_comes_ends_unconfirmed(runtime, recorder, tmp_path):
    """With outcomes awaited, the ack alone is not delivery; no report within the bound: UNCONFIRMED."""
    handles = HandleTable()
    Gateway(runtime, tmp_path / "in.db", Subscribers(), handles, await_outcomes=True, outcome_timeout=0.2)
    waiting, answered = handles.new(b"5" * 16, "p", 1), handles.new(b"6" * 16, "p", 1)
    client = runtime.bus.client()
    client.tell("app", MessagesDelivered((b"5" * 16, b"6" * 16), (1, 1), ("websocket", "libp2p")))
    handles.resolve(b"6" * 16, DeliveryState.DELIVERED, None, None)  # as its outcome report would
    with pytest.raises(Unconfirmed, match=r"no outcome report within 0\.2 s"):
        waiting.result(WAIT)
    assert waiting.status.acked and answered.status.delivered
    assert recorder.wait_for("message_unconfirmed", message_id=(b"5" * 16).hex())


def test_the_gateways_outcome_settings_are_checked(runtime, tmp_path):
    """outcomes_to without node_id, and a non-positive outcome_timeout, are refused naming them."""
    runtime.bus.open_mailbox("app")
    for extra, named in (({"outcomes_to": "retrier"}, "node_id"), ({"outcome_timeout": 0}, "outcome_timeout")):
        config = {"subscribers": Subscribers(), "handles": HandleTable(), "inbox": str(tmp_path / "i"), **extra}
        with pytest.raises(ConfigError, match=named):
            AppActor(ActorContext(runtime.bus, "app", runtime.log, runtime.scheduler, config=config))


def test_a_pending_handle_times_out_politely():
    """result() on a pending handle raises TimeoutError; wait() returns PENDING."""
    handle = HandleTable().new(b"4" * 16)
    assert handle.wait(0.01).state is DeliveryState.PENDING and not handle.done()
    with pytest.raises(TimeoutError):
        handle.result(0.01)


def test_subscribing_bad_values_is_refused():
    """Empty kinds, non-callables and coroutine handlers outside a loop are refused with the value."""
    subs = Subscribers()
    with pytest.raises(ConfigError):
        subs.add("", print)
    with pytest.raises(ConfigError):
        subs.add("DATA", 42)  # type: ignore[arg-type]

    async def handler(message):
        return None

    with pytest.raises(ConfigError, match="running event loop"):
        subs.add("DATA", handler)
    unsubscribe = subs.add("DATA", print)
    unsubscribe()
    unsubscribe()
    assert subs.for_kind("DATA") == []


def test_a_message_that_never_finished_max_dispatches_times_is_set_aside_as_poison(runtime, recorder, tmp_path):
    """Three dispatches began and none finished (each ended by a death mid-handler): the fourth is
    not attempted; the message is marked handled and logged for the operator."""
    subs, seen = Subscribers(), []
    subs.add("DATA", lambda m: seen.append(m.payload))
    inbox = Inbox(tmp_path / "in.db")
    mid, env = envelope()
    inbox.accept(mid, 2000.0, env)
    for _ in range(MAX_DISPATCHES):
        inbox.begin_dispatch(mid)
    inbox.close()
    app = Gateway(runtime, tmp_path / "in.db", subs)
    poisoned = recorder.wait_for("message_poisoned")[0]
    assert (poisoned["message_id"], poisoned["kind"], poisoned["dispatches"]) == (mid.hex(), "DATA", MAX_DISPATCHES)
    assert poisoned["level"] == "error" and app.wait_handled(mid) and seen == []


def test_max_dispatches_must_be_a_positive_int(runtime, tmp_path):
    runtime.bus.open_mailbox("app")
    config = {"subscribers": Subscribers(), "handles": HandleTable(), "inbox": str(tmp_path / "i"), "max_dispatches": 0}
    with pytest.raises(ConfigError, match="max_dispatches must be an int >= 1, got 0"):
        AppActor(ActorContext(runtime.bus, "app", runtime.log, runtime.scheduler, config=config))


def _chunks_seen(runtime: Any, tmp_path: Path, work: float) -> list[int]:
    """How many messages had their dispatch begun and not finished when DATA handlers ran (each of the
    60 when they work, the last 20 when they do not), the 60 queued behind a held handler."""
    path = tmp_path / "in.db"
    gate, held = threading.Event(), threading.Event()
    seen: list[int] = []
    reader: list[Inbox] = []

    def hold(message: Any) -> None:
        held.set()
        gate.wait(WAIT)

    def data(message: Any) -> None:
        if not reader:
            reader.append(Inbox(path))  # opened in the gateway's thread, where it is used
        if int(message.payload) >= 40 or work:  # the last 20 (by then the handlers' speed is known)
            seen.append(len(reader[0].unfinished()))
        if work:
            time.sleep(work)  # the application's work on the message
        if message.payload == b"59":
            reader[0].close()  # in the thread that opened it

    subs = Subscribers()
    subs.add("HOLD", hold)
    subs.add("DATA", data)
    app = Gateway(runtime, path, subs)
    app.incoming(*envelope("HOLD"))
    assert held.wait(WAIT)
    mids = []
    for n in range(60):
        mid, env = envelope(payload=b"%d" % n)
        mids.append(mid)
        app.incoming(mid, env)
    gate.set()
    assert all(app.wait_handled(mid) for mid in mids)
    return seen


def test_fast_handlers_are_dispatched_in_chunks_with_one_pair_of_commits_each(runtime, tmp_path):
    """Sixty fast handlers queued together: once their speed is known, many dispatches begin in one commit."""
    seen = _chunks_seen(runtime, tmp_path, 0.0)
    assert len(seen) == 20 and max(seen) > 1


def test_slow_handlers_are_dispatched_one_per_chunk(runtime, tmp_path):
    """Handlers of 3 ms each (more than a chunk's budget): one dispatch begun at a time, as before batching,
    so a kill redelivers only the message being handled."""
    seen = _chunks_seen(runtime, tmp_path, 0.003)
    assert seen == [1] * 60
