"""Embedding a node in an orchestrator: honest statuses, request/reply, sends that cannot succeed,
backpressure, codecs, events, and the asyncio face. Real nodes on real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WAIT
from villagemesh import AsyncNode, DeliveryState, NodeEvent, OutboxLimits, create_network
from villagemesh.actors.retrier.actor import RetrierActor
from villagemesh.actors.retrier.messages import DeliverMany
from villagemesh.aio import SENDS_PER_TURN, ended
from villagemesh.errors import (
    ConfigError,
    DeliveryFailed,
    OutboxFull,
    RemoteError,
    RequestTimeout,
    Unhandled,
)
from villagemesh.node import ASK_TIMEOUT, Node

pytestmark = pytest.mark.slow


def make(tmp_path: Path, name: str, **settings: Any) -> Node:
    return create_network("hybrid", name=name, data_dir=tmp_path / name, lan=False, **settings)


@pytest.fixture
def pair(tmp_path: Path):
    a = make(tmp_path, "a", discovery_interval=0.3, ack_timeout=2.0).start()
    b = make(tmp_path, "b", discovery_interval=0.3, ack_timeout=2.0, bootstrap=(a.acceptor_address,)).start()
    try:
        assert b.wait_for_peers(1, WAIT) and a.wait_for_peers(1, WAIT)
        yield a, b
    finally:
        b.stop()
        a.stop()


def events_of(node: Node, name: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, node.log_path.read_text().splitlines()) if e["event"] == name]


# -- honest statuses ------------------------------------------------------------------------------


def test_peers_carry_the_nodes_name_from_its_announce(pair) -> None:
    a, b = pair
    assert [p.name for p in b.peers()] == ["a"] and [p.name for p in a.peers()] == ["b"]


def test_delivered_means_a_handler_took_it_and_returned(pair) -> None:
    a, b = pair
    seen: list[bytes] = []
    a.subscribe("DATA", lambda m: seen.append(m.payload))
    handle = b.send(a.node_id, b"x")
    status = handle.result(WAIT)
    assert status.state is DeliveryState.DELIVERED and status.acked and seen == [b"x"]
    [broadcast] = b.broadcast("DATA", b"to all")
    assert broadcast.result(WAIT).delivered and seen == [b"x", b"to all"]
    assert status.message_id == handle.message_id == handle.raw_id.hex()  # one id type: MessageId (hex str)


def test_plain_successes_come_back_in_batch_reports_and_each_handle_ends_delivered(pair) -> None:
    a, b = pair
    got: list[bytes] = []
    a.subscribe("BULK", lambda m: got.append(m.payload))
    handles = b.send_many(((a.node_id, b"%d" % i) for i in range(300)), kind="BULK")
    assert [h.result(WAIT).state for h in handles] == [DeliveryState.DELIVERED] * 300
    assert sorted(got) == sorted(b"%d" % i for i in range(300))
    sent, received = a.network_status()["app"]["outcomes_sent"], b.network_status()["app"]["outcomes_received"]
    assert sent < 300, f"successes arriving together share reports ({sent} reports)"
    assert received == 300, "a batch report ends every handle it names"
    lines = events_of(b, "messages_handled")
    assert lines and sum(len(line["message_ids"]) for line in lines) + len(events_of(b, "message_handled")) == 300
    assert len(lines) < 300, "one log line per batch report"


def test_a_kind_nobody_handles_ends_unhandled_at_the_sender_and_is_logged_and_counted_at_the_receiver(pair) -> None:
    a, b = pair
    handle = b.send(a.node_id, b"lost?", kind="NOBODY")
    with pytest.raises(Unhandled, match="'NOBODY'") as info:
        handle.result(WAIT)
    assert info.value.kind == "NOBODY"
    assert handle.status.state is DeliveryState.UNHANDLED
    [logged] = events_of(a, "message_unhandled")
    assert logged["kind"] == "NOBODY" and logged["sender"] == b.node_id
    assert a.network_status()["app"]["unhandled"] == 1
    assert events_of(b, "message_handled")[-1]["status"] == "unhandled"


def test_a_failing_handler_reaches_the_sender_as_remote_error_with_type_and_message(pair) -> None:
    a, b = pair

    def broken(message: Any) -> None:
        raise KeyError("no such task")

    a.subscribe("DATA", broken)
    handle = b.send(a.node_id, b"boom")
    with pytest.raises(RemoteError) as info:
        handle.result(WAIT)
    assert info.value.exc_type == "KeyError" and "no such task" in info.value.exc_message
    assert "Traceback" not in str(info.value)
    assert handle.status.state is DeliveryState.HANDLER_FAILED
    assert events_of(a, "handler_failed")[0]["exc_type"] == "KeyError"
    assert a.network_status()["app"]["handler_failed"] == 1


def test_a_coroutine_a_plain_handler_returns_is_awaited_on_the_loop_it_subscribed_from(pair) -> None:
    """``subscribe("DATA", lambda m: queue.put(m))`` with an asyncio.Queue: the put runs on that loop."""
    a, b = pair

    async def main() -> bytes:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        a.subscribe("DATA", lambda m: queue.put(m))
        sent = await asyncio.to_thread(b.send, a.node_id, b"queued")
        status = await sent
        assert status.delivered
        return (await asyncio.wait_for(queue.get(), WAIT)).payload

    assert asyncio.run(main()) == b"queued"


def test_a_coroutine_from_a_plain_handler_subscribed_outside_any_loop_is_refused_clearly(pair) -> None:
    a, b = pair
    queue: asyncio.Queue[Any] = asyncio.Queue()
    a.subscribe("DATA", lambda m: queue.put(m))
    with pytest.raises(RemoteError, match="outside an event loop") as info:
        b.send(a.node_id, b"nowhere to run").result(WAIT)
    assert info.value.exc_type == "ConfigError"


# -- request/reply --------------------------------------------------------------------------------


def test_request_returns_what_the_handler_returned_with_a_codec(tmp_path: Path) -> None:
    a = make(tmp_path, "a", discovery_interval=0.3, codec="json").start()
    b = make(tmp_path, "b", discovery_interval=0.3, codec="json", bootstrap=(a.acceptor_address,)).start()
    try:
        assert b.wait_for_peers(1, WAIT)
        a.subscribe("REQUEST", lambda m: {"sum": sum(m.value["numbers"])})
        assert b.request(a.node_id, {"numbers": [1, 2, 3]}, timeout=WAIT) == {"sum": 6}

        def fails(m: Any) -> None:
            raise ValueError(f"cannot add {m.value!r}")

        a.subscribe("ADD", fails)
        with pytest.raises(RemoteError, match="cannot add") as info:
            b.request(a.node_id, "x", kind="ADD", timeout=WAIT)
        assert info.value.exc_type == "ValueError"
        with pytest.raises(ConfigError, match="JSON"):
            b.send(a.node_id, {1, 2})
    finally:
        b.stop()
        a.stop()


def test_a_request_without_a_reply_in_time_raises_request_timeout_and_the_late_reply_is_counted(pair) -> None:
    a, b = pair
    release = threading.Event()

    def slow(m: Any) -> bytes:
        release.wait(WAIT)
        return b"late"

    a.subscribe("REQUEST", slow)
    with pytest.raises(RequestTimeout) as info:
        b.request(a.node_id, b"?", timeout=0.5)
    assert info.value.peer_id == a.node_id and len(info.value.message_id) == 32
    assert a.node_id in str(info.value) and info.value.message_id in str(info.value)
    release.set()
    deadline = time.monotonic() + WAIT
    while b.handles.late == 0 and time.monotonic() < deadline:
        threading.Event().wait(0.02)
    assert b.network_status()["late_replies"] == 1


def test_a_request_survives_a_crash_of_either_sides_retrier_and_gateway(pair) -> None:
    """Built on reliable delivery: both retriers and the responder's gateway restart meanwhile."""
    a, b = pair
    started = threading.Event()

    def answer(m: Any) -> bytes:
        started.set()
        return b"still here"

    a.subscribe("REQUEST", answer)
    a.crash("retrier")
    b.crash("retrier")
    a.crash("app")
    assert b.request(a.node_id, b"?", timeout=WAIT) == b"still here" and started.is_set()
    restarted = {e["child_id"] for e in events_of(a, "child_restarted")} | {
        e["child_id"] for e in events_of(b, "child_restarted")
    }
    assert restarted == {"retrier", "app"}


def test_async_request_reply_and_remote_error(pair) -> None:
    a, b = pair

    async def main() -> Any:
        async def answer(m: Any) -> bytes:
            await asyncio.sleep(0)
            return m.payload.upper()

        a.subscribe("REQUEST", answer)
        reply = await b.aio.request(a.node_id, b"shout", timeout=WAIT)
        with pytest.raises(Unhandled):
            await b.aio.request(a.node_id, b"?", kind="UNKNOWN", timeout=WAIT)
        return reply

    assert asyncio.run(main()) == b"SHOUT"


# -- sends that can never succeed --------------------------------------------------------------------


def test_malformed_and_own_ids_are_refused_at_once_naming_them(pair) -> None:
    _, b = pair
    with pytest.raises(ConfigError, match="'bob'"):
        b.send("bob", b"x")
    with pytest.raises(ConfigError, match="own id"):
        b.send(b.node_id, b"x")
    with pytest.raises(ConfigError, match="villagemesh"):
        b.send("f" * 32, b"x", kind="villagemesh.outcome")
    assert b.network_status()["outbox"] == {"messages": 0, "bytes": 0}


def test_bad_send_values_are_refused_at_once_naming_them(tmp_path: Path) -> None:
    class Strange:
        def encode(self, value: object) -> str:
            return "not bytes"

        def decode(self, data: bytes) -> bytes:
            return data

    node = make(tmp_path, "n", codec=Strange()).start()
    try:
        peer = "1" * 32
        for kwargs, named in (
            ({"ttl": 0}, "ttl"),
            ({"correlation_id": b"short"}, "correlation_id"),
            ({"kind": ""}, "kind"),
            ({"priority": "urgent"}, "priority"),
        ):
            with pytest.raises(ConfigError, match=named):
                node.send(peer, b"x", **kwargs)
        with pytest.raises(ConfigError, match="not bytes"):
            node.send(peer, b"x")
    finally:
        node.stop()
    big = make(tmp_path, "big").start()
    try:
        with pytest.raises(ConfigError, match="exceeds"):
            big.send("1" * 32, b"x" * (1024 * 1024 + 1))
        with pytest.raises(ConfigError, match="min_count"):
            big.get_suitable_evolution_peers(-1)
    finally:
        big.stop()


def test_an_async_request_times_out_naming_peer_and_id_and_a_cancelled_one_counts_its_late_reply(pair) -> None:
    a, b = pair
    release = threading.Event()
    a.subscribe("REQUEST", lambda m: release.wait(WAIT) and b"late")

    async def main() -> None:
        with pytest.raises(RequestTimeout) as info:
            await b.aio.request(a.node_id, b"?", timeout=0.3)
        assert info.value.peer_id == a.node_id
        asking = asyncio.ensure_future(b.aio.request(a.node_id, b"?", timeout=WAIT))
        await asyncio.sleep(0.3)
        asking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asking

    asyncio.run(main())
    release.set()
    deadline = time.monotonic() + WAIT
    while b.handles.late < 2 and time.monotonic() < deadline:
        threading.Event().wait(0.02)
    assert b.handles.late == 2


def test_an_unknown_well_formed_id_waits_for_discovery_only_up_to_its_bound(tmp_path: Path) -> None:
    node = make(tmp_path, "lonely", unknown_peer_timeout=0.5).start()
    try:
        started = time.monotonic()
        with pytest.raises(DeliveryFailed, match="no route") as info:
            node.send("0" * 32, b"anyone?").result(WAIT)
        assert time.monotonic() - started < WAIT and info.value.attempts == 0
        assert events_of(node, "delivery_failed")[0]["reason"] == "no_route"
    finally:
        node.stop()


def test_a_transport_that_dies_fails_its_in_flight_transmits_at_once(pair, tmp_path: Path) -> None:
    """A peer that stopped; something else listens on its port and never answers: the attempt hangs
    in flight. Crashing the transport fails it at once, not at the 30 s ack deadline."""
    a, _ = pair
    c = make(tmp_path, "c", ack_timeout=30.0, max_attempts=1, bootstrap=(a.acceptor_address,)).start()
    try:
        assert c.wait_for_peers(1, WAIT)
        a_id, a_port = a.node_id, a.port
        c.subscribe("DATA", lambda m: None)
        a.stop()
        with socket.socket() as mute:
            mute.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            mute.bind(("127.0.0.1", a_port))
            mute.listen()
            handle = c.send(a_id, b"into the void")
            deadline = time.monotonic() + WAIT
            while c.network_status()["retrier"]["in_flight"] == 0 and time.monotonic() < deadline:
                threading.Event().wait(0.02)
            assert c.network_status()["retrier"]["in_flight"] == 1
            c.crash("libp2p")  # hybrid mode: the first transport, the one the attempt is on
            started = time.monotonic()
            with pytest.raises(DeliveryFailed, match="the transport died"):
                handle.result(WAIT)
            assert time.monotonic() - started < 10.0  # far below the 30 s ack timeout
    finally:
        c.stop()


# -- backpressure ----------------------------------------------------------------------------------


def test_a_full_outbox_blocks_send_up_to_its_timeout_then_raises_outbox_full(tmp_path: Path) -> None:
    node = make(tmp_path, "n", outbox=OutboxLimits(per_peer_messages=3), unknown_peer_timeout=60.0).start()
    try:
        for _ in range(3):
            node.send("1" * 32, b"x" * 1024)
        started = time.monotonic()
        with pytest.raises(OutboxFull, match="per_peer_messages=3") as info:
            node.send("1" * 32, b"x", timeout=0.2)
        assert time.monotonic() - started >= 0.2 and info.value.peer_id == "1" * 32
        node.send("2" * 32, b"other peers still have room")
        assert node.network_status()["outbox"] == {"messages": 4, "bytes": 3 * 1024 + 27}

        async def main() -> None:
            with pytest.raises(OutboxFull):
                await node.aio.send("1" * 32, b"x", timeout=0.1)
            waiting = asyncio.ensure_future(node.aio.send("1" * 32, b"x"))
            await asyncio.sleep(0.1)
            assert not waiting.done(), "asend awaits room"
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting

        asyncio.run(main())
        assert node.network_status()["outbox"]["messages"] == 4, "the cancelled send was withdrawn"
    finally:
        node.stop()


def test_waiting_senders_get_room_in_arrival_order_with_one_wake_up_per_freed_room() -> None:
    """A thousand asyncio senders waiting on a full window: each freed slot wakes the loop once, not each waiter."""
    from villagemesh.actors.app.state import HandleTable
    from villagemesh.aio import _Room

    class Owner:  # what _Room reads of a node
        def __init__(self) -> None:
            self.handles = HandleTable(OutboxLimits(per_peer_messages=2))

    owner = Owner()
    registrations = 0
    on_room = owner.handles.on_room

    def counted(fn: Any) -> None:
        nonlocal registrations
        registrations += 1
        on_room(fn)

    owner.handles.on_room = counted  # type: ignore[method-assign]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        room = _Room(loop, owner)  # type: ignore[arg-type]
        senders = [
            asyncio.ensure_future(room.admit(i.to_bytes(4, "big"), "p", 1, None, None)) for i in range(1000)
        ]
        other = asyncio.ensure_future(room.admit(b"o", "q", 1, None, None))
        late = asyncio.ensure_future(room.admit(b"late", "p", 1, loop.time() + 0.05, 0.05))
        await asyncio.sleep(0.01)
        assert [s.done() for s in senders[:3]] == [True, True, False] and other.done()
        senders[5].cancel()  # gives up its place before its turn
        with pytest.raises(OutboxFull, match="per_peer_messages=2"):
            await late
        order: list[int] = []
        for i, sender in enumerate(senders):
            if i == 5:
                continue
            handle = await asyncio.wait_for(sender, WAIT)
            order.append(int.from_bytes(handle.raw_id, "big"))
            ender = threading.Thread(target=owner.handles.resolve, args=(handle.raw_id, True, 1, None))
            ender.start()  # ends it from another thread, as the gateway does
            ender.join()
        assert order == [i for i in range(1000) if i != 5]
        assert owner.handles.pending_messages == 1  # the other peer's

    asyncio.run(main())
    assert registrations <= 1100, f"{registrations} wake-up registrations for 1,000 waiters"


# -- events ----------------------------------------------------------------------------------------


def test_the_event_stream_tells_peers_deliveries_failures_and_crashes(tmp_path: Path) -> None:
    a = make(tmp_path, "a", discovery_interval=0.3).start()
    seen: list[NodeEvent] = []
    a.on_event(seen.append)

    def broken(event: NodeEvent) -> None:
        raise RuntimeError("a listener's bug")

    a.on_event(broken)
    b = make(tmp_path, "b", discovery_interval=0.3, bootstrap=(a.acceptor_address,)).start()
    try:
        assert a.wait_for_peers(1, WAIT) and b.wait_for_peers(1, WAIT)
        b.subscribe("DATA", lambda m: None)
        a.send(b.node_id, b"hi").result(WAIT)
        with pytest.raises(Unhandled):
            a.send(b.node_id, b"hi", kind="NOPE").result(WAIT)
        a.crash("sweeper")
        deadline = time.monotonic() + WAIT
        while "child_restarted" not in {e.kind for e in seen} and time.monotonic() < deadline:
            threading.Event().wait(0.02)
        kinds = [e.kind for e in seen]
        for kind in ("peer_discovered", "delivered", "failed", "child_crashed", "child_restarted"):
            assert kind in kinds, kinds
        discovered = next(e for e in seen if e.kind == "peer_discovered")
        assert discovered.fields["peer_id"] == b.node_id
        failed = next(e for e in seen if e.kind == "failed")
        assert failed.fields["status"] == "unhandled"
        assert events_of(a, "event_listener_failed")[0]["exc_message"] == "a listener's bug"
    finally:
        b.stop()
        a.stop()


# -- the asyncio face ------------------------------------------------------------------------------


def test_async_node_sends_queries_and_waits_for_peers_by_event(tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncNode(make(tmp_path, "a", discovery_interval=0.3)) as a:
            events = a.events()
            first_event = asyncio.ensure_future(anext(events))
            await asyncio.sleep(0.01)  # listening
            async with AsyncNode(make(tmp_path, "b", discovery_interval=0.3, bootstrap=(a.acceptor_address,))) as b:
                event = await asyncio.wait_for(first_event, WAIT)
                assert event.kind == "peer_discovered" and event.fields["peer_id"] == b.node_id
                await events.aclose()
                assert await b.wait_for_peers(1, WAIT)
                assert not await b.wait_for_peers(5, 0.2)
                assert [p.peer_id for p in await b.peers()] == [a.node_id]
                assert isinstance(await b.get_suitable_evolution_peers(0), list)
                status = await b.network_status()
                assert status["peers"] == 1 and {c["id"] for c in status["actors"]} >= {"retrier", "app"}
                got: asyncio.Queue[bytes] = asyncio.Queue()

                async def on_data(m: Any) -> None:
                    await got.put(m.payload)

                a.subscribe("DATA", on_data)
                [handle] = await b.broadcast("DATA", b"to all")
                assert (await handle).delivered and await asyncio.wait_for(got.get(), WAIT) == b"to all"
                assert (await b.send(a.node_id, b"x", kind="NOBODY")).status.state is DeliveryState.PENDING
                many = [await b.send(a.node_id, bytes([i])) for i in range(5)]
                assert [s.state for s in await ended(many)] == [DeliveryState.DELIVERED] * 5
                assert await ended([]) == []

    asyncio.run(main())


@pytest.mark.parametrize("crash_after", [5, 150, 400])
def test_async_sends_racing_a_retrier_crash_are_each_delivered_once(pair, crash_after: int) -> None:
    """AsyncNode.send hands its loop turn's batch to the retrier and keeps no copy once it is
    stored: the batches still in its mailbox when it crashes are read by the restarted instance
    (the mailbox outlives it), those it had taken are handed over again at its restart, so every
    handle ends DELIVERED and the handler sees each payload once."""
    a, b = pair
    got: list[bytes] = []
    a.subscribe("DATA", lambda m: got.append(m.payload))

    async def main() -> list[Any]:
        sends = [asyncio.ensure_future(b.aio.send(a.node_id, b"%d" % i)) for i in range(600)]
        while sum(s.done() for s in sends) < crash_after:
            await asyncio.sleep(0.001)  # (a spin here would hold the interpreter lock the node's threads need)
        b.crash("retrier")
        handles = await asyncio.gather(*sends)
        return list(await asyncio.wait_for(ended(handles), 60))

    ends = asyncio.run(main())
    assert [e.state for e in ends] == [DeliveryState.DELIVERED] * 600
    assert sorted(got) == sorted(b"%d" % i for i in range(600))
    assert [e["child_id"] for e in events_of(b, "child_restarted")] == ["retrier"]


def test_the_async_sends_of_one_loop_turn_are_stored_by_one_hand_over(pair, monkeypatch) -> None:
    """The group commit of the asyncio face: each loop turn's sends (SENDS_PER_TURN of them) reach
    the retrier as one DeliverMany (one push, one commit), and each send returns once it is stored."""
    a, b = pair
    a.subscribe("DATA", lambda m: None)
    client = b._client()
    told: list[int] = []

    class Recording:
        def tell(self, to: str, msg: Any, **kw: Any) -> None:
            if isinstance(msg, DeliverMany):
                told.append(len(msg.envelopes))
            client.tell(to, msg, **kw)

    monkeypatch.setattr(b, "_client", lambda: Recording())

    async def main() -> list[Any]:
        handles = await asyncio.gather(*(b.aio.send(a.node_id, b"%d" % i) for i in range(5 * SENDS_PER_TURN)))
        return list(await asyncio.wait_for(ended(handles), WAIT))

    ends = asyncio.run(main())
    assert [e.state for e in ends] == [DeliveryState.DELIVERED] * (5 * SENDS_PER_TURN)
    assert told == [SENDS_PER_TURN] * 5, told


def test_async_sends_the_retrier_took_and_lost_in_a_crash_are_handed_over_again_at_its_restart(
    pair, monkeypatch
) -> None:
    """A retrier that crashes while storing a batch of asyncio sends (taken from its mailbox, not
    stored) never answers it; its restart hands the same envelopes over again: every send returns,
    each payload is handled once."""
    a, b = pair
    got: list[bytes] = []
    a.subscribe("DATA", lambda m: got.append(m.payload))
    real = RetrierActor._deliver_many
    crashes: list[int] = []

    def crashing(self: RetrierActor, requests: list[Any]) -> Any:
        batches = [r for r in requests if isinstance(r, DeliverMany) and r.answer_token]
        if batches and not crashes:
            crashes.append(len(batches[0].envelopes))
            raise RuntimeError("the retrier fell over while storing")
        return real(self, requests)

    monkeypatch.setattr(RetrierActor, "_deliver_many", crashing)

    async def main() -> list[Any]:
        handles = await asyncio.gather(*(b.aio.send(a.node_id, b"%d" % i) for i in range(40)))
        return list(await asyncio.wait_for(ended(handles), WAIT))

    started = time.monotonic()
    ends = asyncio.run(main())
    assert crashes and [e.state for e in ends] == [DeliveryState.DELIVERED] * 40
    assert sorted(got) == sorted(b"%d" % i for i in range(40))
    assert time.monotonic() - started < ASK_TIMEOUT, "handed over again at the restart, not after the ask timeout"
    assert [e["child_id"] for e in events_of(b, "child_restarted")] == ["retrier"]


def test_messages_iterates_one_kind_and_a_slow_consumer_holds_the_senders_back(tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncNode(make(tmp_path, "a", discovery_interval=0.3)) as a:
            limits = OutboxLimits(per_peer_messages=2)
            b_node = make(tmp_path, "b", discovery_interval=0.3, bootstrap=(a.acceptor_address,), outbox=limits)
            async with AsyncNode(b_node) as b:
                assert await b.wait_for_peers(1, WAIT) and await a.wait_for_peers(1, WAIT)
                stream = a.messages("JOB", maxsize=1)
                first = asyncio.ensure_future(stream.__anext__())
                await asyncio.sleep(0.05)  # subscribed
                handles = [await b.send(a.node_id, f"job{i}".encode(), kind="JOB") for i in range(4)]
                assert (await asyncio.wait_for(first, WAIT)).payload == b"job0"
                # job1 in the queue, job2 and job3 waiting for room in it: their outcomes wait,
                # so b's window (2) stays full; b's sends of job2 and job3 had waited for job0 and job1.
                await asyncio.sleep(0.3)
                with pytest.raises(OutboxFull):
                    await b.send(a.node_id, b"more", kind="JOB", timeout=0.2)
                rest = [(await asyncio.wait_for(stream.__anext__(), WAIT)).payload for _ in range(3)]
                assert rest == [b"job1", b"job2", b"job3"]
                assert [(await h).state for h in handles] == [DeliveryState.DELIVERED] * 4
                await stream.aclose()

    asyncio.run(main())
