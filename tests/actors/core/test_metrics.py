"""Runtime metrics: messages in and out, mailbox depth and ask latency, counted where the work happens."""

from __future__ import annotations

import threading
import time

from tests.actors.core.test_bus import GATE, Gated, Slow, start
from tests.conftest import WAIT
from tests.supervision._actors import Crash, Ping, Probe, Seq
from villagemesh.actors.core.base import Scheduler
from villagemesh.actors.core.bus import Bus
from villagemesh.actors.core.metrics import Metrics, percentile
from villagemesh.supervision.log import EventLog
from villagemesh.supervision.spec import ChildSpec
from villagemesh.supervision.supervisor import Environment


def test_tells_and_asks_are_counted_in_and_out_with_ask_latency(runtime, recorder):
    """What a client sends is the actor's 'in'; each ask leaves a latency; nothing waits once handled."""
    start(runtime, ChildSpec("p", Probe))
    client = runtime.bus.client()
    for i in range(10):
        client.tell("p", Seq(i))
    for i in range(5):
        client.ask("p", Ping(i), timeout=WAIT)
    row = runtime.bus.metrics.snapshot()["p"]
    assert (row["in"], row["depth"], row["asks"]) == (15, 0, 5)
    assert 0 < row["ask_p50_ms"] <= row["ask_p99_ms"]


def test_messages_waiting_in_a_mailbox_show_as_its_depth(runtime):
    """While an actor is blocked, what is sent to it waits: depth counts it."""
    GATE.clear()
    start(runtime, ChildSpec("g", Gated))
    client = runtime.bus.client()
    client.tell("g", Slow(False))
    for _ in range(7):
        client.tell("g", Slow(True))
    try:
        deadline = time.monotonic() + WAIT  # the row appears once the actor's mailbox has been counted
        while (row := runtime.bus.metrics.snapshot().get("g", {})).get("depth", 0) < 7:
            assert time.monotonic() < deadline, f"depth never reached 7: {row}"
            time.sleep(0.005)
    finally:
        GATE.set()
    client.ask("g", Slow(True), timeout=WAIT)
    assert runtime.bus.metrics.snapshot()["g"]["depth"] == 0


def test_the_figures_survive_a_restart_and_a_closed_sender(runtime, recorder):
    """Counts belong to the bus, not the instance: a crash and a closed client thread lose none."""
    start(runtime, ChildSpec("p", Probe))

    def send_and_close() -> None:
        sender = runtime.bus.client()
        for i in range(4):
            sender.tell("p", Seq(i))
        sender.close()

    thread = threading.Thread(target=send_and_close)
    thread.start()
    thread.join(WAIT)
    client = runtime.bus.client()
    client.tell("p", Crash("exception"))
    recorder.wait_for("child_restarted", child_id="p")
    client.ask("p", Ping(0), timeout=WAIT)
    row = runtime.bus.metrics.snapshot()["p"]
    assert (row["in"], row["depth"]) == (6, 0)


def test_an_actor_that_only_sends_is_listed_with_its_out(runtime, recorder):
    """A sender with no mailbox figures of its own still shows what it sent."""
    metrics = Metrics()

    class FakeSender:
        owner = "producer"
        sent = {"p": 3}

    metrics.add_sender(FakeSender())
    assert metrics.snapshot()["producer"]["out"] == 3


def test_metrics_can_be_turned_off(tmp_path):
    """Bus(metrics=False) counts nothing."""
    bus = Bus("quiet", metrics=False)
    env = Environment(bus=bus, log=EventLog("quiet", human=False), scheduler=Scheduler())
    sup = start(env, ChildSpec("p", Probe))
    try:
        bus.client().ask("p", Ping(1), timeout=WAIT)
        assert bus.metrics.snapshot()["p"]["in"] == 0 and bus.client().sent == {}
    finally:
        sup.actor_ref.stop(block=True, timeout=WAIT)
        env.scheduler.close()
        bus.close()


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
