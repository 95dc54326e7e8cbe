"""The retrier actor between two in-process nodes: failover, dedup, acks, crashes of either side, TTL."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pykka
import pytest

from tests.conftest import WAIT, Recorder
from villagemesh.actors.app.state import Bridge
from villagemesh.actors.core.base import Actor, InjectedCrash, Scheduler
from villagemesh.actors.core.bus import Bus, Sender
from villagemesh.actors.core.ledger import Inbox
from villagemesh.actors.core.transport import Received, Transmit, TransmitMany, TransmitResult
from villagemesh.actors.registry.messages import ListRoutes, PeerRoutes, RoutesList
from villagemesh.actors.retrier.actor import RetrierActor, retrier_status, send_envelope, send_envelopes
from villagemesh.actors.retrier.messages import (
    ACK_KIND,
    DeliverMany,
    DeliverManyReply,
    Handled,
    Incoming,
    IncomingMany,
    MessageFailed,
    MessagesDelivered,
    ack_ids,
)
from villagemesh.actors.retrier.store import Outbox
from villagemesh.errors import ActorCrashed, DeliveryFailed, LocalProtocolError
from villagemesh.protocols.envelope import Message, Priority, decode_message, encode_message
from villagemesh.protocols.transfer import CHUNK_KIND
from villagemesh.supervision.log import EventLog
from villagemesh.supervision.spec import ChildSpec, SupervisorSpec
from villagemesh.supervision.supervisor import Environment, Supervisor


class Wire:
    """What the fake transports do; tests flip these."""

    buses: dict[str, Bus] = {}
    refusing: set[str] = set()
    duplicate = False
    drop_acks = threading.Event()


class FakeTransport(Actor):
    """A transport carrying envelopes to another in-process node's retrier (its bus is in Wire.buses)."""

    def on_start(self) -> None:
        self.node = self.ctx.config["node"]
        self.senders: dict[str, Sender] = {}

    def on_stop(self) -> None:
        for sender in self.senders.values():
            sender.close()

    def handle(self, msg: Any) -> Any:
        if isinstance(msg, TransmitMany):
            for one in msg:
                self.handle(one)
            return None
        if not isinstance(msg, Transmit):
            return None
        if self.name in Wire.refusing:
            self.tell(msg.reply_to, TransmitResult(msg.message_id, self.name, msg.peer_id, False, True, "refused"))
            return None
        self.tell(msg.reply_to, TransmitResult(msg.message_id, self.name, msg.peer_id, True, False, None))
        if Wire.drop_acks.is_set() and decode_message(msg.envelope).kind == "ACK":
            return None
        sender = self.senders.get(msg.peer_id)
        if sender is None:
            sender = self.senders[msg.peer_id] = Sender(Wire.buses[msg.peer_id], owner=f"{self.name}@{self.node}")
        for _ in range(2 if Wire.duplicate else 1):
            sender.tell("retrier", Received(self.name, msg.envelope, self.node))
        return None


class FakeRegistry(Actor):
    """Answers the retrier's ListRoutes at start: the other node on libp2p and websocket."""

    def handle(self, msg: Any) -> Any:
        if isinstance(msg, ListRoutes) and msg.reply_to is not None:
            other = "B" if self.ctx.config["node"] == "A" else "A"
            addresses = (("libp2p", (f"libp2p://{other}:1",)), ("websocket", (f"ws://{other}:2",)))
            self.tell(msg.reply_to, RoutesList((PeerRoutes(other, addresses),)))
        return None


class App(Actor):
    """The application on a node: handles Incoming (telling Handled), collects delivery reports."""

    handled: Counter[tuple[str, bytes]] = Counter()
    reports: list[tuple[str, object]] = []
    ignore_first: set[str] = set()
    cond = threading.Condition()

    def handle(self, msg: Any) -> Any:
        if isinstance(msg, IncomingMany):
            for one in msg:
                self.handle(one)
            return None
        node = self.ctx.config["node"]
        with App.cond:
            if isinstance(msg, Incoming):
                if node in App.ignore_first:
                    App.ignore_first.discard(node)  # "crashes" before handling: no Handled
                    App.reports.append((node, "ignored"))
                else:
                    App.handled[(node, msg.message_id)] += 1
                    self.tell("retrier", Handled(msg.message_id))
            else:
                App.reports.append((node, msg))
            App.cond.notify_all()
        return None

    @classmethod
    def wait(cls, predicate: Any) -> None:
        with cls.cond:
            assert cls.cond.wait_for(predicate, WAIT), (len(cls.handled), cls.reports[-5:])


@dataclass(frozen=True)
class Delivery:
    """One delivery of a MessagesDelivered report."""

    message_id: bytes
    attempts: int
    transport: str | None


def delivered(node: str) -> list[Delivery]:
    """Every delivery reported to ``node``'s application, in order."""
    return [Delivery(*d) for n, r in App.reports if n == node and isinstance(r, MessagesDelivered) for d in r]


@pytest.fixture
def nodes(tmp_path: Path, recorder: Recorder, request: Any) -> Iterator[dict[str, Environment]]:
    """Two nodes, A and B, each with an app, libp2p and websocket fakes, and a retrier on its own file
    (retrier settings overridden by an indirect parameter)."""
    Wire.buses, Wire.refusing, Wire.duplicate = {}, set(), False
    Wire.drop_acks.clear()
    App.handled, App.reports, App.ignore_first = Counter(), [], set()
    envs: dict[str, Environment] = {}
    for node in ("A", "B"):
        bus = Bus(f"retrier-test-{node}-{os.getpid()}-{time.monotonic_ns()}")
        log = EventLog(bus.node, tmp_path / f"{node}.log.jsonl", human=False, sinks=[recorder])
        envs[node] = Environment(bus=bus, log=log, scheduler=Scheduler())
        Wire.buses[node] = bus
    for node, env in envs.items():
        retrier = {
            "path": str(tmp_path / f"{node}.db"),
            "node_id": node,
            "deliver_to": "app",
            "report_to": "app",
            "registry": "registry",
            "ack_timeout": 1.0,
            "backoff_base": 0.05,
            "backoff_max": 0.2,
            **getattr(request, "param", {}),
        }
        children = [
            ChildSpec("registry", FakeRegistry, config={"node": node}),
            ChildSpec("app", App, config={"node": node}),
            ChildSpec("libp2p", FakeTransport, config={"node": node}),
            ChildSpec("websocket", FakeTransport, config={"node": node}),
            ChildSpec("retrier", RetrierActor, config=retrier),
        ]
        Supervisor.launch(SupervisorSpec(f"root-{node}", children, intensity=10), env)
    for env in envs.values():  # both retriers know the way back before anything is sent
        recorder.wait_for("routes_loaded", node=env.bus.node)
    yield envs
    pykka.ActorRegistry.stop_all(block=True, timeout=5)
    for env in envs.values():
        env.bus.close()
        env.scheduler.close()
        env.log.close()


def envelope(sender: str, recipient: str | None, n: int, *, ttl: float = 60.0, kind: str = "DATA") -> bytes:
    return encode_message(
        Message(
            id=os.urandom(16),
            kind=kind,
            sender=sender,
            recipient=recipient,
            priority=Priority.BULK if kind == CHUNK_KIND else Priority(n % 5),
            created_at=time.time(),
            ttl=ttl,
            correlation_id=None,
            payload=b"hello %d" % n,
        )
    )


def send_many(env: Environment, count: int, recipient: str = "B") -> list[bytes]:
    client = env.bus.client()
    return [send_envelope(client, envelope("A", recipient, n), timeout=WAIT) for n in range(count)]


def test_messages_fail_over_to_the_next_transport_and_arrive_once(nodes):
    """libp2p refuses on A: each of 50 messages goes on websocket (attempt ≥ 2), is handled once, reported once."""
    Wire.refusing = {"libp2p"}
    ids = send_many(nodes["A"], 50)
    App.wait(lambda: len(delivered("A")) == 50 and sum(1 for node, _ in App.handled if node == "B") == 50)
    assert sorted(r.message_id for r in delivered("A")) == sorted(ids)
    assert {r.transport for r in delivered("A")} == {"websocket"}
    assert min(r.attempts for r in delivered("A")) == 2  # a very slow ack may add a round, never fewer
    assert {mid: c for (node, mid), c in App.handled.items() if node == "B"} == dict.fromkeys(ids, 1)


def test_duplicated_envelopes_are_handled_once_and_counted(nodes):
    """A wire that delivers every envelope twice: the app sees each once; B counts 30 duplicates."""
    Wire.duplicate = True
    ids = send_many(nodes["A"], 30)
    App.wait(lambda: len(delivered("A")) == 30 and sum(1 for node, _ in App.handled if node == "B") == 30)
    assert [App.handled[("B", mid)] for mid in ids] == [1] * 30
    status = retrier_status(nodes["B"].bus.client(), timeout=WAIT)
    assert (status.received, status.duplicates) == (60, 30)


def test_sender_crash_with_messages_in_flight_delivers_each_exactly_once(nodes, recorder):
    """Acks lost, then A's retrier crashes with 200 in flight: its successor replays the outbox; B dedups."""
    Wire.drop_acks.set()
    ids = send_many(nodes["A"], 200)
    App.wait(lambda: sum(1 for node, _ in App.handled if node == "B") == 200)
    nodes["A"].bus.client().tell("retrier", InjectedCrash("test"))  # it crashes and is restarted
    recorder.wait_for("child_restarted", child_id="retrier", node=nodes["A"].bus.node)
    restored = recorder.wait_for("retrier_restored", node=nodes["A"].bus.node, count=2)[-1]
    assert restored["pending"] == 200
    Wire.drop_acks.clear()
    App.wait(lambda: len(delivered("A")) == 200)
    assert sorted(r.message_id for r in delivered("A")) == sorted(ids)
    assert [App.handled[("B", mid)] for mid in ids] == [1] * 200
    assert retrier_status(nodes["A"].bus.client(), timeout=WAIT).pending == 0


@pytest.mark.parametrize("nodes", [{"ack_timeout": 60.0}], indirect=True)
def test_after_a_restart_messages_in_flight_are_resent_at_once_not_after_their_ack_timeout(nodes, recorder):
    """Sent, their acks lost, then A's retrier restarts: each goes again at once (B dedups), not in 60 s."""
    Wire.drop_acks.set()
    ids = send_many(nodes["A"], 20)
    App.wait(lambda: sum(1 for node, _ in App.handled if node == "B") == 20)
    Wire.drop_acks.clear()
    nodes["A"].bus.client().tell("retrier", InjectedCrash("test"))
    recorder.wait_for("child_restarted", child_id="retrier", node=nodes["A"].bus.node)
    App.wait(lambda: len(delivered("A")) == 20)  # App.wait gives up after WAIT, far below the 60 s ack timeout
    assert sorted(r.message_id for r in delivered("A")) == sorted(ids)
    assert [App.handled[("B", mid)] for mid in ids] == [1] * 20


def test_receiver_crash_before_handling_redispatches_from_its_inbox(nodes, recorder):
    """B accepts and acks, its app dies before handling; B's restarted retrier dispatches it again: handled once."""
    App.ignore_first = {"B"}
    (message_id,) = send_many(nodes["A"], 1)
    App.wait(lambda: len(delivered("A")) == 1 and ("B", "ignored") in App.reports)
    assert App.handled[("B", message_id)] == 0
    nodes["B"].bus.client().tell("retrier", InjectedCrash("test"))
    restored = recorder.wait_for("retrier_restored", node=nodes["B"].bus.node, count=2)[-1]
    assert restored["unhandled"] == 1
    App.wait(lambda: App.handled[("B", message_id)] == 1)


def test_expired_message_is_reported_as_delivery_failed(nodes):
    """No route to C and a 0.2 s TTL: MessageFailed(ttl_expired, 0 attempts), whose exception is DeliveryFailed."""
    client = nodes["A"].bus.client()
    message_id = send_envelope(client, envelope("A", "C", 0, ttl=0.2), timeout=WAIT)
    App.wait(lambda: any(isinstance(r, MessageFailed) for _, r in App.reports))
    (failed,) = [r for _, r in App.reports if isinstance(r, MessageFailed)]
    assert (failed.message_id, failed.attempts, failed.reason) == (message_id, 0, "ttl_expired")
    exc = failed.exception()
    assert isinstance(exc, DeliveryFailed) and exc.attempts == 0 and "ttl expired" in exc.last_error


def test_invalid_and_broadcast_envelopes_are_refused(nodes):
    """Garbage and broadcasts are LocalProtocolErrors for the caller; the retrier keeps running."""
    client = nodes["A"].bus.client()
    with pytest.raises(LocalProtocolError, match="not a valid envelope"):
        send_envelope(client, b"\x01garbage", timeout=WAIT)
    with pytest.raises(LocalProtocolError, match="broadcast"):
        send_envelope(client, envelope("A", None, 0), timeout=WAIT)
    assert retrier_status(client, timeout=WAIT).pending == 0


def test_resubmitting_a_pending_envelope_does_not_send_it_twice(nodes):
    """The same envelope handed over twice is stored once and delivered once."""
    Wire.drop_acks.set()
    client = nodes["A"].bus.client()
    body = envelope("A", "B", 1)
    first = send_envelope(client, body, timeout=WAIT)
    assert send_envelope(client, body, timeout=WAIT) == first
    Wire.drop_acks.clear()
    App.wait(lambda: len(delivered("A")) >= 1 and App.handled[("B", first)] >= 1)
    assert App.handled[("B", first)] == 1 and len(delivered("A")) == 1


def test_a_stored_message_already_counts_its_first_attempt(nodes, tmp_path):
    """When Deliver's reply comes, the outbox row is there with attempt 1 and its ack deadline (one commit)."""
    Wire.drop_acks.set()
    message_id = send_envelope(nodes["A"].bus.client(), envelope("A", "B", 1), timeout=WAIT)
    with Outbox(tmp_path / "A.db") as outbox:  # another connection, as a restarted node would read it
        row = outbox.get(message_id)
    assert row is not None and row.attempts == 1 and row.next_attempt_at > row.created_at


def test_an_outbox_row_the_state_does_not_know_crashes_the_retrier_which_restores_it(nodes, recorder, tmp_path):
    """The file and the state disagree (someone else wrote the outbox): StorageError, restart, the row restored."""
    Wire.drop_acks.set()
    body = envelope("A", "B", 1)
    message = decode_message(body)
    with Outbox(tmp_path / "A.db") as outbox:
        outbox.put(
            message.id, "B", message.priority, body, created_at=message.created_at, expires_at=message.expires_at
        )
    with pytest.raises(ActorCrashed, match="were stored already"):
        send_envelope(nodes["A"].bus.client(), body, timeout=WAIT)
    restored = recorder.wait_for("retrier_restored", node=nodes["A"].bus.node, count=2)[-1]
    assert restored["pending"] == 1
    assert send_envelope(nodes["A"].bus.client(), body, timeout=WAIT) == message.id  # pending now: stored once


def test_many_envelopes_in_one_ask_are_stored_together_and_each_gets_its_answer(nodes):
    """DeliverMany: 20 good envelopes, garbage, a broadcast and a repeat: the reply names each in order;
    the 20 are delivered and handled once."""
    good = [envelope("A", "B", n) for n in range(20)]
    reply = send_envelopes(nodes["A"].bus.client(), [*good, b"\x01junk", envelope("A", None, 0), good[0]], timeout=WAIT)
    ids = [decode_message(e).id for e in good]
    assert list(reply.message_ids[:20]) == ids and reply.message_ids[-1] == ids[0]
    assert reply.errors[:20] == (None,) * 20 and reply.errors[-1] is None  # a repeat: already stored
    assert "not a valid envelope" in reply.errors[20] and "broadcast" in reply.errors[21]
    App.wait(lambda: len(delivered("A")) == 20 and sum(1 for node, _ in App.handled if node == "B") == 20)
    assert {mid: c for (node, mid), c in App.handled.items() if node == "B"} == dict.fromkeys(ids, 1)


BRIDGE = Bridge()


@pytest.mark.parametrize("nodes", [{"bridge": BRIDGE}], indirect=True)
def test_a_told_deliver_many_with_an_answer_token_is_answered_through_the_bridge_once_stored(nodes):
    """The asyncio face's hand-over: no asker, the reply resolves the bridge token's future on its loop."""
    good = [envelope("A", "B", n) for n in range(5)]

    async def main() -> Any:
        token, answered = BRIDGE.register()
        nodes["A"].bus.client().tell("retrier", DeliverMany((*good, b"\x01junk"), answer_token=token))
        return await asyncio.wait_for(answered, WAIT)

    reply = asyncio.run(main())
    assert isinstance(reply, DeliverManyReply) and reply.errors[:5] == (None,) * 5
    assert "not a valid envelope" in (reply.errors[5] or "")
    App.wait(lambda: sum(1 for node, _ in App.handled if node == "B") == 5)


def test_an_answer_token_without_a_bridge_to_answer_through_is_a_config_error_storing_nothing(
    nodes, recorder, tmp_path
):
    nodes["A"].bus.client().tell("retrier", DeliverMany((envelope("A", "B", 0),), answer_token=7))
    [crash] = recorder.wait_for("child_crashed", child_id="retrier")
    assert crash["exc_type"] == "ConfigError" and "answer_token 7" in crash["exc_message"]
    with Outbox(str(tmp_path / "A.db")) as outbox:
        assert outbox.pending() == []


def test_one_ack_envelope_settles_every_message_it_lists(nodes):
    """With B's acks lost, one ack envelope naming five messages (the first in correlation_id, the rest in
    its payload) delivers all five at A, reported to A's application in one MessagesDelivered."""
    Wire.drop_acks.set()
    ids = send_many(nodes["A"], 5)
    App.wait(lambda: sum(1 for node, _ in App.handled if node == "B") == 5)
    ack = Message(
        id=os.urandom(16),
        kind=ACK_KIND,
        sender="B",
        recipient="A",
        priority=Priority.CRITICAL,
        created_at=time.time(),
        ttl=60.0,
        correlation_id=ids[0],
        payload=b"".join(ids[1:]),
    )
    assert ack_ids(ack.correlation_id, ack.payload) == ids
    nodes["A"].bus.client().tell("retrier", Received("websocket", encode_message(ack), "B"))
    App.wait(lambda: len(delivered("A")) == 5)
    assert sorted(r.message_id for r in delivered("A")) == sorted(ids)
    (report,) = [r for n, r in App.reports if n == "A" and isinstance(r, MessagesDelivered)]
    assert len(report) == 5 and set(report.message_ids) == set(ids) and report.attempts == (1,) * 5


@pytest.mark.parametrize("nodes", [{"max_attempts": 60}], indirect=True)
def test_a_peer_refusing_every_transport_is_probed_one_message_at_a_time_then_gets_everything(nodes):
    """Both transports refuse: B is unreachable, A holds 39 of 40 messages (one probe at a time, in the
    status); once B is reachable again every message arrives once and nothing is held."""
    from tests.integration._nodes import wait_until

    client = nodes["A"].bus.client()
    Wire.refusing = {"libp2p", "websocket"}
    ids = send_many(nodes["A"], 40)

    def held(at_least: int) -> bool:
        status = retrier_status(client, timeout=WAIT)
        return status.unreachable_peers == 1 and status.held >= at_least

    assert wait_until(lambda: held(39), WAIT), retrier_status(client, timeout=WAIT)
    Wire.refusing = set()
    App.wait(lambda: len(delivered("A")) == 40 and sum(1 for node, _ in App.handled if node == "B") == 40)
    assert {mid: c for (node, mid), c in App.handled.items() if node == "B"} == dict.fromkeys(ids, 1)
    status = retrier_status(client, timeout=WAIT)
    assert (status.unreachable_peers, status.held, status.pending) == (0, 0, 0) and status.probes >= 1


@pytest.mark.parametrize("nodes", [{"transfer_to": "app"}], indirect=True)
def test_transfer_chunks_are_never_stored_and_are_acked_only_once_handled(nodes, tmp_path):
    """Chunk envelopes (a transfer's bulk) stay out of A's outbox and B's inbox; B acks one only after the
    Handled of ``transfer_to``: one B drops unhandled is sent again by A (ack timeout) and handled then."""
    Wire.drop_acks.set()
    App.ignore_first = {"B"}
    client = nodes["A"].bus.client()
    ids = [send_envelope(client, envelope("A", "B", n, kind=CHUNK_KIND), timeout=WAIT) for n in range(10)]
    App.wait(lambda: sum(1 for node, _ in App.handled if node == "B") == 9)
    assert Outbox(str(tmp_path / "A.db")).pending() == []  # in flight, yet no row: held in memory
    assert retrier_status(client, timeout=WAIT).pending == 10
    Wire.drop_acks.clear()
    App.wait(lambda: sum(1 for node, _ in App.handled if node == "B") == 10)  # the ignored one: resent
    deadline = time.monotonic() + WAIT
    while retrier_status(client, timeout=WAIT).pending and time.monotonic() < deadline:
        time.sleep(0.05)
    status = retrier_status(client, timeout=WAIT)
    assert (status.pending, status.delivered) == (0, 10)  # every chunk acked once handled
    assert delivered("A") == []  # a chunk's outcome is not reported to the app
    assert sorted(mid for node, mid in App.handled if node == "B") == sorted(ids)
    inbox = Inbox(str(tmp_path / "B.db"))
    assert [inbox.payload(mid) for mid in ids] == [None] * 10  # never stored at B either
    inbox.close()


@pytest.mark.parametrize("nodes", [{"transfer_to": "app", "max_attempts": 1}], indirect=True)
def test_a_held_chunk_that_is_never_handled_is_forgotten_after_the_ack_timeout(nodes):
    """B's ``transfer_to`` loses a chunk (no Handled: it crashed with it) and A gives it up (one attempt):
    B's retrier forgets it once the ack timeout (1 s here) has passed, instead of holding it for good;
    the chunks that are handled are acked and held no longer."""
    App.ignore_first = {"B"}
    client = nodes["A"].bus.client()
    b = nodes["B"].bus.client()
    [send_envelope(client, envelope("A", "B", n, kind=CHUNK_KIND), timeout=WAIT) for n in range(3)]
    App.wait(lambda: sum(1 for node, _ in App.handled if node == "B") == 2 and (("B", "ignored") in App.reports))
    deadline = time.monotonic() + WAIT  # the Handled of the two (told by B's app) reach B's retrier soon after
    while retrier_status(b, timeout=WAIT).chunks_held > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert retrier_status(b, timeout=WAIT).chunks_held <= 1  # the lost one (0 if its ack timeout passed already)
    deadline = time.monotonic() + WAIT
    while retrier_status(b, timeout=WAIT).chunks_held and time.monotonic() < deadline:
        time.sleep(0.05)
    assert retrier_status(b, timeout=WAIT).chunks_held == 0
    deadline = time.monotonic() + WAIT
    while retrier_status(client, timeout=WAIT).pending and time.monotonic() < deadline:
        time.sleep(0.05)
    status = retrier_status(client, timeout=WAIT)
    assert (status.pending, status.delivered, status.failed) == (0, 2, 1)  # the lost chunk: given up
