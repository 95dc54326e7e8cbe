"""The discovery sweeper: all transports at once; a failing, hanging or missing one never stops the others."""

from __future__ import annotations

import threading
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import WAIT
from villagemesh.actors.core.base import Actor
from villagemesh.actors.core.transport import Discover, Discovered, Sighting
from villagemesh.actors.sweeper.actor import SweeperActor
from villagemesh.actors.sweeper.messages import Sighted, SweepNow, SweepStatus
from villagemesh.actors.sweeper.state import SweepState, round_gap
from villagemesh.supervision.spec import ChildSpec, SupervisorSpec
from villagemesh.supervision.supervisor import Supervisor

SIGHTED: list[Sighting] = []
SIGHTED_EVENT = threading.Event()


class Answering(Actor):
    """A transport whose discovery finds one peer."""

    def handle(self, msg: Any) -> Any:
        if isinstance(msg, Discover):
            sighting = Sighting(self.name, '{"node_id": "abc"}', 1.5)
            self.tell(msg.reply_to, Discovered(msg.round, self.name, (sighting,), ()))
        return None


class Failing(Actor):
    """A transport whose discovery reports an error."""

    def handle(self, msg: Any) -> Any:
        if isinstance(msg, Discover):
            self.tell(msg.reply_to, Discovered(msg.round, self.name, (), ("radio off",)))
        return None


class Silent(Actor):
    """A transport whose discovery never answers (hangs)."""

    def handle(self, msg: Any) -> Any:
        return None


class Registry(Actor):
    """Records what the sweeper passes on."""

    def handle(self, msg: Any) -> Any:
        if isinstance(msg, Sighted):
            SIGHTED.extend(msg.sightings)
            SIGHTED_EVENT.set()
        return None


def test_one_hanging_and_one_failing_transport_do_not_stop_the_answering_one(runtime, recorder):
    """The answering transport's peers reach the registry; the round names who failed and who timed out."""
    SIGHTED.clear()
    SIGHTED_EVENT.clear()
    transports = ["websocket", "bitchat", "betanet", "libp2p"]  # libp2p has no actor at all
    children = [
        ChildSpec("registry", Registry),
        ChildSpec("websocket", Answering),
        ChildSpec("bitchat", Failing),
        ChildSpec("betanet", Silent),
        ChildSpec("sweeper", SweeperActor, config={"transports": transports, "timeout": 0.3, "interval": 60}),
    ]
    Supervisor.launch(SupervisorSpec("root", children), runtime)
    assert SIGHTED_EVENT.wait(WAIT)
    assert SIGHTED[0].transport == "websocket"
    round_ = recorder.wait_for("discovery_round")[0]
    assert sorted(round_["answered"]) == ["bitchat", "websocket"]  # in order of arrival
    assert round_["timed_out"] == ["betanet"]
    assert set(round_["failed"]) == {"bitchat", "libp2p"}
    assert "radio off" in round_["failed"]["bitchat"] and "NoSuchActor" in round_["failed"]["libp2p"]
    status = runtime.bus.client().ask("sweeper", SweepStatus(), timeout=WAIT)
    assert status.rounds == 1 and status.sightings == 1


def test_a_round_closes_early_when_every_transport_answered(runtime, recorder):
    """With only answering transports the round does not wait for its deadline; SweepNow starts another."""
    children = [
        ChildSpec("registry", Registry),
        ChildSpec("websocket", Answering),
        ChildSpec("sweeper", SweeperActor, config={"transports": ["websocket"], "timeout": 30, "interval": 60}),
    ]
    Supervisor.launch(SupervisorSpec("root", children), runtime)
    recorder.wait_for("discovery_round")
    runtime.bus.client().tell("sweeper", SweepNow())
    rounds = recorder.wait_for("discovery_round", count=2)
    assert [r["round"] for r in rounds] == [1, 2]


def test_rounds_repeat_every_interval(runtime, recorder):
    """After a round closes the next one starts `interval` seconds later, on a timer."""
    children = [
        ChildSpec("registry", Registry),
        ChildSpec("websocket", Answering),
        ChildSpec("sweeper", SweeperActor, config={"transports": ["websocket"], "timeout": 2, "interval": 0.05}),
    ]
    Supervisor.launch(SupervisorSpec("root", children, intensity=10), runtime)
    recorder.wait_for("discovery_round", count=3)
    assert all(r["answered"] == ["websocket"] for r in recorder.matching("discovery_round"))


@given(
    st.lists(st.sampled_from(["a", "b", "c", "d"]), unique=True, min_size=1),
    st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["a", "b", "c", "d", "x"]), st.integers(0, 3))),
)
def test_every_transport_ends_each_round_answered_failed_or_timed_out(transports, answers):
    """Whatever answers arrive (late, duplicate, unknown), each transport is accounted for exactly once."""
    state = SweepState(tuple(transports))
    for _ in range(3):
        r = state.start()
        for round_, transport, count in answers:
            state.answered(r - round_, transport, count, ())
        outcome = state.close(r)
        assert outcome is not None and state.close(r) is None
        assert set(outcome.answered) | set(outcome.timed_out) | set(outcome.failed) == set(transports)
        assert not set(outcome.answered) & set(outcome.timed_out)


@given(st.integers(1, 200), st.floats(0.01, 100), st.just(0.0) | st.floats(0.001, 10))
def test_round_gaps_start_fast_and_settle_at_the_interval(rounds_done, interval, fast_start):
    """Gaps never exceed the interval, never shrink from one round to the next, and reach the interval."""
    gap = round_gap(rounds_done, interval, fast_start)
    assert 0 < gap <= interval
    assert round_gap(rounds_done + 1, interval, fast_start) >= gap
    assert round_gap(rounds_done + 80, interval, fast_start) == interval
    if fast_start == 0:
        assert gap == interval
    if rounds_done == 1 and 0 < fast_start <= interval:
        assert gap == fast_start


def test_a_fast_start_runs_the_first_rounds_sooner(runtime, recorder):
    """With fast_start, rounds come at 0, fast_start, 2 x fast_start, ... before the interval (60 s)."""
    children = [
        ChildSpec("registry", Registry),
        ChildSpec("websocket", Answering),
        ChildSpec(
            "sweeper",
            SweeperActor,
            config={"transports": ["websocket"], "timeout": 2, "interval": 60, "fast_start": 0.02},
        ),
    ]
    Supervisor.launch(SupervisorSpec("root", children, intensity=10), runtime)
    recorder.wait_for("discovery_round", count=4)
