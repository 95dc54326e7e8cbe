"""Batch turns and late replies in the actor base (``gen_server``'s ``noreply`` then ``reply/2``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import zmq

from tests.conftest import WAIT
from villagemesh.actors.core import codec
from villagemesh.actors.core.base import Actor, InjectedCrash, ReplyToken, Request
from villagemesh.actors.core.bus import Kind, decode_frame, encode_frame
from villagemesh.errors import ActorCrashed, BusError
from villagemesh.supervision.spec import ChildSpec, SupervisorSpec
from villagemesh.supervision.supervisor import Supervisor


@codec.message("batch_test.Item")
@dataclass(frozen=True, slots=True)
class Item:
    n: int


@codec.message("batch_test.Hold")
@dataclass(frozen=True, slots=True)
class Hold:
    """The turn that takes this waits for the test's gate (so that others pile up behind it)."""


@codec.message("batch_test.Boom")
@dataclass(frozen=True, slots=True)
class Boom:
    """A batch turn that takes this raises after it has taken every message."""


@codec.message("batch_test.Keep")
@dataclass(frozen=True, slots=True)
class Keep:
    """Ask: the handler keeps the token and answers at the next Release."""


@codec.message("batch_test.Release")
@dataclass(frozen=True, slots=True)
class Release:
    answer: int


@codec.message("batch_test.Batches")
@dataclass(frozen=True, slots=True)
class Batches:
    sizes: tuple[int, ...]
    items: tuple[int, ...]


GATE = threading.Event()
HELD = threading.Event()


class Batching(Actor):
    """Records each batch turn; answers each ask, after the turn's work, with its batch's size."""

    batch_limit = 64

    def on_start(self) -> None:
        self.sizes: list[int] = []
        self.items: list[int] = []
        self.batch_limit = int(self.ctx.config.get("limit", 64))

    def handle_batch(self, batch: list[Request]) -> None:
        self.sizes.append(len(batch))
        for request in batch:
            if isinstance(request.msg, Hold):
                HELD.set()
                GATE.wait(WAIT)
            elif isinstance(request.msg, Item):
                self.items.append(request.msg.n)
        if any(isinstance(r.msg, Boom) for r in batch):
            raise RuntimeError("crashed after taking the batch, before replying")
        # "the commit": everything of the turn is done; now each asker is answered
        for request in batch:
            if request.token is not None:
                if isinstance(request.msg, Batches):
                    request.token.reply(Batches(tuple(self.sizes), tuple(self.items)))
                else:
                    request.token.reply(Item(len(batch)))


class Deferring(Actor):
    """Keeps the token of every Keep ask; a Release answers them all."""

    def on_start(self) -> None:
        self.kept: list[ReplyToken] = []

    def handle(self, msg):
        if isinstance(msg, Keep):
            self.kept.append(self.defer_reply())
            return Item(-1)  # ignored: the token answers
        if isinstance(msg, Release):
            for token in self.kept:
                assert token.reply(Item(msg.answer))
                assert not token.reply(Item(0)), "a token answers once"
            self.kept.clear()
            return None
        if isinstance(msg, Item):
            return self.defer_reply()  # a tell has no token
        return None


def start(env, *children):
    return Supervisor.launch(SupervisorSpec("root", list(children), intensity=50), env)


class Asks:
    """Several asks in flight at once from this one thread, in order behind its earlier tells.

    (``Sender.ask`` waits for each answer; a batch needs several askers waiting together.)
    """

    def __init__(self, runtime, to: str) -> None:
        self.sender = runtime.bus.client()
        self.to = to
        self.socket = self.sender._ensure_reply_socket()
        self.socket.setsockopt(zmq.RCVTIMEO, int(WAIT * 1000))
        self.sent = 0

    def send(self, msg: object) -> None:
        self.sent += 1
        self.sender.send_frame(self.to, encode_frame(Kind.ASK, self.sent, self.sender._reply_name, msg))

    def answers(self) -> dict[int, object]:
        """correlation -> answer, or the ActorCrashed it raised, for every ask sent."""
        got: dict[int, object] = {}
        while len(got) < self.sent:
            kind, correlation, _, answer = decode_frame(self.socket.recv())
            if kind is Kind.FAULT:
                answer = ActorCrashed(answer.actor, answer.exc_type, answer.detail)
            got[correlation] = answer
        return got


def _pile_up(runtime, name: str, tells: int, asks: int) -> Asks:
    """Block ``name`` in a turn, then queue ``tells`` tells and ``asks`` asks behind it."""
    GATE.clear()
    HELD.clear()
    pending = Asks(runtime, name)
    pending.sender.tell(name, Hold())
    assert HELD.wait(WAIT)
    for n in range(tells):
        pending.sender.tell(name, Item(n))
    for n in range(asks):
        pending.send(Item(100 + n))
    return pending


def test_a_batch_turn_takes_every_message_already_waiting_and_answers_each_asker_after_it(runtime):
    """Ten tells and three asks waiting behind a busy turn are handled as one turn; each asker gets its answer."""
    start(runtime, ChildSpec("b", Batching))
    pending = _pile_up(runtime, "b", tells=10, asks=3)
    GATE.set()
    answers = [a.n for a in pending.answers().values()]
    status = runtime.bus.client().ask("b", Batches((), ()), timeout=WAIT)
    assert status.sizes[0] == 1  # the Hold went alone: nothing waited when it arrived
    assert status.sizes[1] == 13 and answers == [13, 13, 13]
    assert status.items[:10] == tuple(range(10))  # in mailbox order
    assert sorted(status.items[10:]) == [100, 101, 102]


def test_a_lone_message_goes_alone_at_once(runtime):
    """With nothing else waiting, a batch turn is one message: no waiting to fill it."""
    start(runtime, ChildSpec("b", Batching))
    client = runtime.bus.client()
    assert client.ask("b", Item(1), timeout=WAIT).n == 1
    assert client.ask("b", Item(2), timeout=WAIT).n == 1


def test_a_batch_turn_takes_at_most_its_limit(runtime):
    """Twenty tells waiting for an actor whose limit is 8 are taken in turns of at most 8."""
    start(runtime, ChildSpec("b", Batching, config={"limit": 8}))
    _pile_up(runtime, "b", tells=20, asks=0)
    GATE.set()
    status = runtime.bus.client().ask("b", Batches((), ()), timeout=WAIT)
    assert max(status.sizes) <= 8
    assert status.items == tuple(range(20))


def test_a_crash_between_taking_a_batch_and_replying_faults_every_asker(runtime):
    """Every asker of a batch whose turn raises gets ActorCrashed at once, never a hang; the next instance serves."""
    start(runtime, ChildSpec("b", Batching))
    pending = _pile_up(runtime, "b", tells=2, asks=3)
    pending.sender.tell("b", Boom())
    GATE.set()
    answers = pending.answers()
    assert len(answers) == 3
    for answer in answers.values():
        assert isinstance(answer, ActorCrashed) and answer.exc_type == "RuntimeError"
    assert runtime.bus.client().ask("b", Item(7), timeout=WAIT).n == 1


def test_an_injected_crash_inside_a_batch_ends_it_and_the_rest_waits_for_the_next_instance(runtime):
    """The messages ahead of an InjectedCrash are handled, the crash ends the instance, those behind it survive."""
    start(runtime, ChildSpec("b", Batching))
    pending = _pile_up(runtime, "b", tells=3, asks=0)
    client = pending.sender
    client.tell("b", InjectedCrash("drill"))
    for n in range(3, 6):
        client.tell("b", Item(n))
    GATE.set()
    status = client.ask("b", Batches((), ()), timeout=WAIT)  # the new instance's record
    assert status.items == (3, 4, 5)


def test_a_deferred_reply_answers_an_ask_after_its_handler_returned(runtime):
    """Two asks whose handler kept their tokens are answered by a later message, once each."""
    start(runtime, ChildSpec("d", Deferring))
    pending = Asks(runtime, "d")
    pending.send(Keep())
    pending.send(Keep())
    pending.sender.tell("d", Release(42))
    assert {c: a.n for c, a in pending.answers().items()} == {1: 42, 2: 42}


def test_an_instance_that_ends_with_a_kept_token_faults_its_asker(runtime):
    """An ask whose token was kept gets ActorCrashed when the instance crashes before answering."""
    start(runtime, ChildSpec("d", Deferring))
    pending = Asks(runtime, "d")
    pending.send(Keep())
    pending.sender.tell("d", InjectedCrash("drill"))
    assert isinstance(pending.answers()[1], ActorCrashed)


def test_defer_reply_outside_an_ask_is_refused(runtime, recorder):
    """A tell has no asker to answer later: defer_reply raises (a crash the supervisor sees)."""
    start(runtime, ChildSpec("d", Deferring))
    runtime.bus.client().tell("d", Item(1))
    crashed = recorder.wait_for("child_crashed", child_id="d")
    assert "defer_reply outside" in crashed[0]["exc_message"] and crashed[0]["exc_type"] == BusError.__name__
