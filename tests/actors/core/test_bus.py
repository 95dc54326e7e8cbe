"""The bus: addressing, tell and ask, bounded mailboxes, timers, and isolation between nodes."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import zmq

from tests.conftest import WAIT
from tests.supervision._actors import RECEIVED, Crash, Ping, Pong, Probe, Seq
from villagemesh.actors.core import codec
from villagemesh.actors.core.base import Actor, ActorContext, Scheduler, _BusInbox
from villagemesh.actors.core.bus import Bus, Kind, decode_frame, encode_frame
from villagemesh.errors import AskTimeout, BusError, CodecError, ConfigError, MailboxFull, NoSuchActor
from villagemesh.supervision.spec import ChildSpec, SupervisorSpec
from villagemesh.supervision.supervisor import Supervisor


@codec.message("bus_test.Later")
@dataclass(frozen=True, slots=True)
class Later:
    delay: float
    payload: int


@codec.message("bus_test.Note")
@dataclass(frozen=True, slots=True)
class Note:
    text: str


@codec.message("bus_test.Slow")
@dataclass(frozen=True, slots=True)
class Slow:
    release: bool


class Timed(Actor):
    """Schedules a message to itself; handles it later (time is a message)."""

    def on_start(self) -> None:
        self.seen: list[int] = []

    def handle(self, msg):
        if isinstance(msg, Later):
            if msg.delay:
                self.schedule(msg.delay, Later(0, msg.payload))
            else:
                RECEIVED[f"{self.ctx.bus.node}/{self.name}"].append(msg.payload)
        return None


GATE = threading.Event()


class Gated(Actor):
    """Blocks on a gate in its handler so its mailbox fills."""

    def handle(self, msg):
        if isinstance(msg, Slow) and not msg.release:
            GATE.wait(WAIT)
        return None


def start(env, *children):
    return Supervisor.launch(SupervisorSpec("root", list(children), intensity=50), env)


def test_tell_and_ask_reach_an_actor_by_name(runtime):
    """A client thread tells and asks an actor through its inproc address."""
    start(runtime, ChildSpec("p", Probe))
    client = runtime.bus.client()
    assert runtime.bus.address("p") == f"inproc://{runtime.bus.node}/p"
    client.tell("p", Seq(7))
    assert client.ask("p", Ping(1), timeout=WAIT).n == 2
    assert RECEIVED[f"{runtime.bus.node}/p"] == [7]


def test_unknown_names_raise_no_such_actor(runtime):
    """Sending to a name nobody registered fails at once, naming it."""
    with pytest.raises(NoSuchActor, match="'ghost'"):
        runtime.bus.client().tell("ghost", Ping(1))
    with pytest.raises(NoSuchActor, match="'ghost'"):
        runtime.bus.mailbox("ghost")


def test_ask_needs_a_positive_timeout(runtime):
    """There is no ask without a timeout."""
    start(runtime, ChildSpec("p", Probe))
    with pytest.raises(ConfigError, match="timeout"):
        runtime.bus.client().ask("p", Ping(1), timeout=0)


def test_ask_times_out_and_a_late_reply_is_counted_not_confused(runtime):
    """A reply that arrives after its ask timed out is dropped and counted; the next ask gets its own."""
    GATE.clear()
    start(runtime, ChildSpec("g", Gated))
    client = runtime.bus.client()
    with pytest.raises(AskTimeout, match="'g'"):
        client.ask("g", Slow(False), timeout=0.1)
    GATE.set()
    assert client.ask("g", Slow(True), timeout=WAIT).__class__.__name__ == "Ok"
    assert client.late_replies == 1


def test_a_full_mailbox_raises_mailbox_full_after_the_send_timeout(tmp_path):
    """With capacity 10, a blocked actor's mailbox refuses the sender after its timeout instead of blocking forever."""
    from villagemesh.supervision.log import EventLog
    from villagemesh.supervision.supervisor import Environment

    GATE.clear()
    bus = Bus("tiny", capacity=10, send_timeout=0.05)
    env = Environment(bus=bus, log=EventLog("tiny", human=False), scheduler=Scheduler())
    sup = start(env, ChildSpec("g", Gated))
    client = bus.client()
    client.tell("g", Slow(False))
    with pytest.raises(MailboxFull, match="'g'"):
        for i in range(10_000):
            client.tell("g", Seq(i))
    GATE.set()
    sup.actor_ref.stop(timeout=WAIT)
    bus.close()
    env.scheduler.close()


def test_scheduled_messages_arrive_after_their_delay_without_sleeping_in_the_handler(runtime):
    """schedule() delivers a message to the instance later; the handler returned at once."""
    start(runtime, ChildSpec("t", Timed))
    client = runtime.bus.client()
    client.tell("t", Later(0.05, 1))
    client.tell("t", Later(0, 2))
    deadline = time.monotonic() + WAIT
    while len(RECEIVED[f"{runtime.bus.node}/t"]) < 2 and time.monotonic() < deadline:
        client.ask("t", Ping(0), timeout=WAIT)  # a round trip through the actor, not a sleep
    assert RECEIVED[f"{runtime.bus.node}/t"] == [2, 1]


def test_two_nodes_in_one_process_cannot_reach_each_other(runtime):
    """Each node has its own zmq Context: a name on one bus does not exist on another."""
    other = Bus("elsewhere")
    try:
        start(runtime, ChildSpec("p", Probe))
        with pytest.raises(NoSuchActor):
            other.client().tell("p", Ping(1))
        assert other.context is not runtime.bus.context
    finally:
        other.close()


def test_a_garbage_frame_is_logged_and_the_actor_keeps_serving(runtime, recorder):
    """A frame that does not decode is rejected with a log event, not a crash."""
    start(runtime, ChildSpec("p", Probe))
    sock = runtime.bus.context.socket(zmq.PUSH)
    sock.connect(runtime.bus.address("p"))
    sock.send(b"\xc1garbage")
    sock.close(linger=1000)
    rejected = recorder.wait_for("message_rejected", actor="p")[0]
    assert "msgpack" in rejected["reason"]
    assert isinstance(runtime.bus.client().ask("p", Ping(1), timeout=WAIT), Pong)
    assert recorder.matching("child_crashed") == []


def test_frames_round_trip_and_bad_headers_are_refused():
    """encode_frame/decode_frame are inverses; a bad header is a CodecError."""
    assert decode_frame(encode_frame(Kind.ASK, 9, "_reply/x", Ping(3))) == (Kind.ASK, 9, "_reply/x", Ping(3))
    with pytest.raises(CodecError):
        decode_frame(codec.pack((9, 1, None, "test.Ping", 1)))
    with pytest.raises(CodecError):
        decode_frame(codec.pack((0, 1)))


def test_bus_validates_its_settings_and_refuses_use_after_close():
    """Bad node names and capacities are refused; a closed bus opens no mailbox."""
    with pytest.raises(ConfigError):
        Bus("a/b")
    with pytest.raises(ConfigError):
        Bus("x", capacity=0)
    with pytest.raises(ConfigError):
        Bus("x", send_timeout=0)
    bus = Bus("closing")
    with pytest.raises(ConfigError):
        bus.open_mailbox("_private")
    bus.close()
    bus.close()
    with pytest.raises(BusError, match="closed"):
        bus.open_mailbox("late")


def test_messages_sent_just_before_the_sender_closes_still_arrive(runtime):
    """A sender that sends and closes at once loses nothing (its sockets linger)."""
    start(runtime, ChildSpec("p", Probe))

    def burst() -> None:
        sender = runtime.bus.client()
        for i in range(500):
            sender.tell("p", Seq(i))
        sender.close()

    t = threading.Thread(target=burst)
    t.start()
    t.join(WAIT)
    # Different senders have no common order: ask until the burst is in (bounded), then compare.
    deadline = time.monotonic() + WAIT
    while len(RECEIVED[f"{runtime.bus.node}/p"]) < 500 and time.monotonic() < deadline:
        runtime.bus.client().ask("p", Ping(0), timeout=WAIT)
    assert RECEIVED[f"{runtime.bus.node}/p"] == list(range(500))


def test_actor_context_requires_an_open_mailbox(runtime):
    """An actor cannot start under a name with no mailbox: NoSuchActor names it."""
    ctx = ActorContext(bus=runtime.bus, name="nobox", log=runtime.log, scheduler=runtime.scheduler)
    with pytest.raises(NoSuchActor, match="'nobox'"):
        Probe(ctx)


def test_a_message_msgpack_cannot_carry_is_refused_and_the_sender_keeps_working(runtime):
    """A lone surrogate cannot be encoded: tell and ask raise CodecError, and the next message goes out intact."""
    start(runtime, ChildSpec("p", Probe))
    client = runtime.bus.client()
    with pytest.raises(CodecError, match="surrogates"):
        client.tell("p", Note("\ud800"))
    with pytest.raises(CodecError, match="surrogates"):
        client.ask("p", Note("\ud800"), timeout=WAIT)
    assert client.ask("p", Ping(1), timeout=WAIT).n == 2


def test_an_inbox_that_waits_at_once_still_returns_what_arrives(runtime):
    """With the idle hint (set after a quick reply) the inbox waits without reading first; a frame
    or a control item that arrives is returned, and a frame already there is read without waiting."""
    box = runtime.bus.open_mailbox("raw")
    inbox = _BusInbox(box)
    client = runtime.bus.client()
    try:
        inbox.idle = True
        client.send_frame("raw", b"one")
        assert inbox.get() == b"one"
        assert not inbox.idle
        inbox.idle = True
        putter = threading.Thread(target=inbox.put, args=("control item",))
        putter.start()
        assert inbox.get() == "control item"
        putter.join(WAIT)
        client.send_frame("raw", b"two")
        client.send_frame("raw", b"three")
        assert [inbox.get(), inbox.get()] == [b"two", b"three"]
    finally:
        inbox.close()


def test_a_pykka_ask_that_raises_gets_the_error_and_the_actor_serves_on(runtime):
    """Control items keep pykka's contract: a proxy call's exception goes to its caller, not a crash."""
    runtime.bus.open_mailbox("solo")
    probe = Probe.launch(ActorContext(bus=runtime.bus, name="solo", log=runtime.log, scheduler=runtime.scheduler))
    with pytest.raises(RuntimeError, match="asked to crash"):
        probe.actor_ref.proxy().handle(Crash("exception")).get(timeout=WAIT)
    assert runtime.bus.client().ask("solo", Ping(1), timeout=WAIT).n == 2
    probe.actor_ref.stop(timeout=WAIT)
    assert probe.finished.wait(WAIT)


def test_a_far_timer_neither_kills_the_timer_thread_nor_delays_the_others() -> None:
    """A deadline beyond what Condition.wait accepts (an extreme TTL) waits in steps; a near
    timer scheduled after it still fires."""
    scheduler = Scheduler("far")
    fired = threading.Event()
    far = scheduler.call_later(1e12, fired.set)
    time.sleep(0.05)  # the thread is now waiting for the far deadline
    scheduler.call_later(0.01, fired.set)
    assert fired.wait(WAIT)
    far.cancel()
    scheduler.close()
