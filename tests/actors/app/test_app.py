"""The application gateway: subscribers (threads and asyncio), handles, and failing handlers."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest

from tests.conftest import WAIT
from villagemesh.actors.app.actor import AppActor
from villagemesh.actors.app.state import DeliveryState, HandleTable, Subscribers
from villagemesh.actors.base import Actor
from villagemesh.actors.retrier.messages import Handled, Incoming, MessageDelivered, MessageFailed
from villagemesh.errors import ConfigError, DeliveryFailed
from villagemesh.protocols.envelope import Message, Priority, encode_message
from villagemesh.supervision.spec import ChildSpec, SupervisorSpec
from villagemesh.supervision.supervisor import Supervisor

HANDLED: list[bytes] = []
HANDLED_EVENT = threading.Event()


class FakeRetrier(Actor):
    """Records Handled acknowledgements."""

    def handle(self, msg: Any) -> Any:
        if isinstance(msg, Handled):
            HANDLED.append(msg.message_id)
            HANDLED_EVENT.set()
        return None


def envelope(kind: str = "DATA", payload: bytes = b"hi") -> tuple[bytes, bytes]:
    mid = os.urandom(16)
    msg = Message(mid, kind, "a" * 32, "b" * 32, Priority.NORMAL, 1000.0, 60.0, None, payload)
    return mid, encode_message(msg)


def start(runtime, subscribers, handles):
    config = {"subscribers": subscribers, "handles": handles}
    children = [ChildSpec("retrier", FakeRetrier), ChildSpec("app", AppActor, config=config)]
    return Supervisor.launch(SupervisorSpec("root", children), runtime)


def test_inbound_messages_reach_their_kind_and_wildcard_subscribers_then_are_marked_handled(runtime):
    """DATA goes to DATA and '*' handlers, not to HEARTBEAT handlers; then Handled goes to the retrier."""
    HANDLED.clear()
    HANDLED_EVENT.clear()
    subs, seen = Subscribers(), []
    subs.add("DATA", lambda m: seen.append(("data", m.payload)))
    subs.add("*", lambda m: seen.append(("any", m.payload)))
    subs.add("HEARTBEAT", lambda m: seen.append(("hb", m.payload)))
    start(runtime, subs, HandleTable())
    mid, env = envelope()
    runtime.bus.client().tell("app", Incoming(mid, env))
    assert HANDLED_EVENT.wait(WAIT)
    assert seen == [("data", b"hi"), ("any", b"hi")] and HANDLED == [mid]


def test_a_failing_handler_is_logged_and_the_others_still_run(runtime, recorder):
    """An application exception is logged with its traceback; the gateway does not crash."""
    HANDLED.clear()
    HANDLED_EVENT.clear()
    subs, seen = Subscribers(), []

    def bad(message):
        raise ValueError("application bug")

    subs.add("DATA", bad)
    subs.add("DATA", lambda m: seen.append(m.payload))
    start(runtime, subs, HandleTable())
    mid, env = envelope()
    runtime.bus.client().tell("app", Incoming(mid, env))
    failed = recorder.wait_for("handler_failed")[0]
    assert failed["exc_type"] == "ValueError" and "application bug" in failed["traceback"]
    assert HANDLED_EVENT.wait(WAIT) and seen == [b"hi"]
    assert recorder.matching("child_crashed") == []


def test_a_garbage_envelope_is_rejected_and_still_marked_handled(runtime, recorder):
    """Bytes that are not an envelope are logged and never dispatched; the retrier need not retry them."""
    HANDLED.clear()
    HANDLED_EVENT.clear()
    start(runtime, Subscribers(), HandleTable())
    runtime.bus.client().tell("app", Incoming(b"x" * 16, b"\x07garbage"))
    recorder.wait_for("message_rejected", actor="app")
    assert HANDLED_EVENT.wait(WAIT) and HANDLED == [b"x" * 16]


def test_coroutine_handlers_run_on_the_loop_they_subscribed_from(runtime):
    """An async handler subscribed inside asyncio runs on that loop, not in the gateway's thread."""
    subs = Subscribers()
    start(runtime, subs, HandleTable())

    async def main() -> tuple[int, int]:
        got: asyncio.Queue[int] = asyncio.Queue()

        async def handler(message):
            await got.put(threading.get_ident())

        subs.add("DATA", handler)
        mid, env = envelope()
        await asyncio.to_thread(runtime.bus.client().tell, "app", Incoming(mid, env))
        return await asyncio.wait_for(got.get(), WAIT), threading.get_ident()

    handler_thread, loop_thread = asyncio.run(main())
    assert handler_thread == loop_thread


def test_delivery_updates_resolve_handles_for_waiters_callbacks_and_awaiters(runtime):
    """A handle ends delivered or failed; wait, result, callbacks and await all see it."""
    handles = HandleTable()
    start(runtime, Subscribers(), handles)
    ok, bad = handles.new(b"1" * 16), handles.new(b"2" * 16)
    called = []
    ok.add_done_callback(called.append)
    client = runtime.bus.client()
    client.tell("app", MessageDelivered(b"1" * 16, 1, "websocket"))
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
        await asyncio.to_thread(client.tell, "app", MessageDelivered(b"3" * 16, 2, "websocket"))
        return await asyncio.wait_for(h, WAIT)

    assert asyncio.run(awaited()).attempts == 2
    assert len(handles) == 0


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
