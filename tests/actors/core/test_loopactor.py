"""The transport shell's way in: envelopes decoded on the loop reach ``deliver_to``, told by the loop
thread itself when small, through the actor thread when large or when the mailbox cannot take them,
and in the order they were decoded either way."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from tests.conftest import WAIT
from villagemesh.actors.core import codec
from villagemesh.actors.core.base import Actor, Scheduler
from villagemesh.actors.core.bus import Bus
from villagemesh.actors.core.loopactor import DIRECT_MAX_BYTES, EnvelopeTransportActor
from villagemesh.actors.core.transport import ReceivedMany
from villagemesh.supervision.log import EventLog
from villagemesh.supervision.spec import ChildSpec, SupervisorSpec
from villagemesh.supervision.supervisor import Environment, Supervisor

GOT: list[bytes] = []
PASSES: list[int] = []
"""How many envelopes each ReceivedMany the sink got held."""
LOCK = threading.Lock()
GATE = threading.Event()
FEEDERS: list[Feeder] = []


@codec.message("loopactor_test.Feed")
@dataclass(frozen=True, slots=True)
class Feed:
    """Decode ``count`` envelopes of ``size`` bytes on the loop, in one pass."""

    count: int
    size: int
    first: int = 0


@codec.message("loopactor_test.FeedTwo")
@dataclass(frozen=True, slots=True)
class FeedTwo:
    """On the loop, while the actor thread waits: a pass of one large envelope, then a pass of small ones."""

    first: int
    small: int


@codec.message("loopactor_test.Told")
@dataclass(frozen=True, slots=True)
class Told:
    """How many envelopes the loop thread told itself (the reply to a Feed of 0)."""

    n: int


class Feeder(EnvelopeTransportActor):
    transport = "test"

    def on_start(self) -> None:
        FEEDERS.append(self)
        self.start_io()
        self.start_inbound(self.ctx.config["deliver_to"])

    def handle(self, msg: object) -> object:
        if isinstance(msg, Feed):

            def decode_pass() -> None:
                for i in range(msg.count):
                    self.envelope_received(None, (msg.first + i).to_bytes(4, "big") + bytes(msg.size - 4), "peer")

            self.io_loop.call_soon(decode_pass)
            return Told(self.told_from_loop)
        if isinstance(msg, FeedTwo):

            async def two_passes() -> None:
                self.envelope_received(None, msg.first.to_bytes(4, "big") + bytes(DIRECT_MAX_BYTES - 4), "peer")
                await asyncio.sleep(0)  # the large pass is posted to this (busy) actor thread
                for i in range(msg.small):
                    self.envelope_received(None, (msg.first + 1 + i).to_bytes(4, "big") + bytes(60), "peer")
                await asyncio.sleep(0)  # the small pass could go at once, ahead of the large one
                await asyncio.sleep(0)

            self.io_loop.call(two_passes(), WAIT)
            return None
        return None


class Collector(Actor):
    """Records each envelope's number; waits at GATE while it is cleared."""

    def handle(self, msg: object) -> object:
        if isinstance(msg, ReceivedMany):
            GATE.wait(WAIT)
            with LOCK:
                GOT.extend(msg.envelopes)
                PASSES.append(len(msg))
        return None


def numbers() -> list[int]:
    with LOCK:
        return sorted(int.from_bytes(e[:4], "big") for e in GOT)


def wait_for(count: int) -> list[int]:
    deadline = time.monotonic() + WAIT
    while len(numbers()) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return numbers()


def arrivals() -> list[int]:
    """Each envelope's number, in the order the sink handled them."""
    with LOCK:
        return [int.from_bytes(e[:4], "big") for e in GOT]


def launch(env: Environment) -> Supervisor:
    GOT.clear()
    PASSES.clear()
    children = [ChildSpec("sink", Collector), ChildSpec("feeder", Feeder, config={"deliver_to": "sink"})]
    return Supervisor.launch(SupervisorSpec("root", children, intensity=50), env)


def told(env: Environment) -> int:
    reply = env.bus.client().ask("feeder", Feed(0, 4), timeout=WAIT)
    assert isinstance(reply, Told)
    return reply.n


def test_small_envelopes_are_told_by_the_loop_and_large_ones_by_the_actor_thread(runtime: Environment) -> None:
    GATE.set()
    launch(runtime)
    client = runtime.bus.client()
    client.ask("feeder", Feed(100, 64), timeout=WAIT)
    assert wait_for(100) == list(range(100))
    assert told(runtime) == 100
    client.ask("feeder", Feed(3, DIRECT_MAX_BYTES, first=100), timeout=WAIT)  # large: the actor thread's way
    assert wait_for(103) == list(range(103))
    assert told(runtime) == 100
    with LOCK:
        assert sorted(len(e) for e in GOT)[-3:] == [DIRECT_MAX_BYTES] * 3
        assert PASSES == [100, 3]  # each pass is one ReceivedMany, whichever thread told it


@contextmanager
def tiny_mailboxes(node: str) -> Iterator[Environment]:
    """A node whose mailboxes hold 4 frames, the sink's gate closed, the feeder and sink started."""
    bus = Bus(node, capacity=4, send_timeout=WAIT)
    env = Environment(bus=bus, log=EventLog(node, human=False), scheduler=Scheduler())
    GATE.clear()
    sup = launch(env)
    try:
        yield env
    finally:
        GATE.set()
        sup.actor_ref.stop(timeout=WAIT)
        bus.close()
        env.scheduler.close()


def test_envelopes_the_full_mailbox_cannot_take_wait_in_the_actor_thread_and_none_is_lost() -> None:
    with tiny_mailboxes("tinyloop") as env:
        client = env.bus.client()
        for start in range(0, 40, 4):  # ten passes: the sink's mailbox fills after a few
            client.tell("feeder", Feed(4, 64, first=start))  # told: the feeder waits for room meanwhile
            time.sleep(0.01)
        time.sleep(0.2)
        assert len(numbers()) == 0
        GATE.set()
        got = wait_for(40)
        assert got == list(range(40)), "an envelope was lost or doubled"
        assert told(env) < 40  # some went the actor thread's way, waiting for room


def test_small_passes_after_a_large_one_never_overtake_it(runtime: Environment) -> None:
    """A pass with a large envelope goes the actor thread's way; the small pass after it, which the
    loop could tell at once, arrives after it all the same (a transfer's chunk, then messages: FIFO),
    and once the actor thread has told the large one, small passes go the loop's way again."""
    GATE.set()
    launch(runtime)
    client = runtime.bus.client()
    for first in range(0, 60, 6):
        client.ask("feeder", FeedTwo(first, 5), timeout=WAIT)  # the actor thread is busy meanwhile
    assert wait_for(60) == list(range(60))
    assert arrivals() == list(range(60)), "a later pass overtook an earlier one"
    client.ask("feeder", Feed(5, 64, first=60), timeout=WAIT)
    assert wait_for(65) == list(range(65)) and arrivals() == list(range(65))
    assert told(runtime) >= 5  # the loop's way again


def test_order_is_kept_when_the_full_mailbox_sends_passes_the_actor_threads_way() -> None:
    with tiny_mailboxes("tinyorder") as env:
        client = env.bus.client()
        for start in range(0, 60, 3):
            client.tell("feeder", Feed(3, 64, first=start))  # told: the feeder waits for room meanwhile
            time.sleep(0.01)
            if start == 30:
                GATE.set()  # the sink drains while passes still come: the loop's way opens again
        assert wait_for(60) == list(range(60))
        assert arrivals() == list(range(60)), "a later pass overtook an earlier one"


def test_the_loops_sender_is_closed_when_the_actor_stops(runtime: Environment) -> None:
    GATE.set()
    sup = launch(runtime)
    runtime.bus.client().ask("feeder", Feed(5, 64), timeout=WAIT)
    assert wait_for(5) == list(range(5))
    sender = FEEDERS[-1]._loop_sender
    assert sender is not None and not sender.closed
    sup.actor_ref.stop(timeout=WAIT)
    assert sender.closed


pytestmark = pytest.mark.timeout(120)
