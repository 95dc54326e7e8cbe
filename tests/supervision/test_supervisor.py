"""Supervisors with real actor threads: every failure path, every strategy, the log event by event."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tests.conftest import WAIT
from tests.supervision._actors import COUNTERS, RECEIVED, RELEASE, Crash, Ping, Pong, Probe, Seq, StopSelf
from villagemesh.actors.core.base import Actor
from villagemesh.errors import ActorCrashed, AskTimeout
from villagemesh.supervision.spec import Backoff, ChildSpec, SupervisorSpec
from villagemesh.supervision.supervisor import Supervisor, which_children


def start(env, *children, **kwargs):
    kwargs.setdefault("intensity", 100)
    return Supervisor.launch(SupervisorSpec("root", list(children), **kwargs), env)


def ask(env, name, msg, timeout=WAIT):
    return env.bus.client().ask(name, msg, timeout=timeout)


def instance_of(env, name):
    return ask(env, name, Ping(0)).instance


@pytest.mark.parametrize("how", ["exception", "system_exit", "keyboard_interrupt", "thread"])
def test_every_in_thread_failure_is_restarted(runtime, recorder, how):
    """A handler exception, a BaseException and an owned thread's death each end in a restart."""
    start(runtime, ChildSpec("p", Probe))
    before = instance_of(runtime, "p")
    runtime.bus.client().tell("p", Crash(how))
    crash = recorder.wait_for("child_crashed", child_id="p")[0]
    recorder.wait_for("child_restarted", child_id="p")
    assert instance_of(runtime, "p") != before
    expected = {"exception": "RuntimeError", "thread": "OwnedThreadDied"}.get(how, "BaseExceptionInHandler")
    assert crash["exc_type"] == expected
    assert crash["traceback"].startswith("Traceback")


def test_a_crash_report_traceback_is_pythons_without_the_column_markers():
    """Crash tracebacks read as ``traceback.format_exception``'s, chained causes included, minus the
    ``^^^`` lines (drawing them parses every frame's source: half the cost of a crash report)."""
    import traceback

    from villagemesh.actors.core.base import format_traceback

    def fail() -> None:
        try:
            {}["key"]
        except KeyError as exc:
            raise ValueError("wrapped") from exc

    try:
        fail()
    except ValueError as exc:
        error = exc
    python = "".join(traceback.format_exception(error))
    ours = format_traceback(error, error.__traceback__)
    assert "^^^" in python and "^" not in ours
    lines = python.splitlines(keepends=True)
    unmarked = "".join(line for line in lines if not (line.strip() and set(line.strip()) <= set("^~")))
    assert ours == unmarked and "KeyError: 'key'" in ours and "direct cause" in ours


def test_base_exception_in_handler_does_not_stop_other_actors(runtime, recorder):
    """pykka would stop every actor on a BaseException; here only the failing one restarts."""
    start(runtime, ChildSpec("a", Probe), ChildSpec("b", Probe))
    b_before = instance_of(runtime, "b")
    runtime.bus.client().tell("a", Crash("system_exit"))
    recorder.wait_for("child_restarted", child_id="a")
    assert instance_of(runtime, "b") == b_before
    assert recorder.matching("child_crashed", child_id="b") == []


def test_crash_in_on_start_is_restarted(runtime, recorder):
    """pykka does not call on_failure for an on_start crash; the supervisor still sees and restarts it."""
    start(runtime, ChildSpec("p", Probe, config={"crash_on_start": 2}))
    crashes = recorder.wait_for("child_crashed", count=2, child_id="p")
    assert "on_start crash number 1" in crashes[0]["exc_message"]
    assert isinstance(ask(runtime, "p", Ping(1)), Pong)
    assert COUNTERS[f"{runtime.bus.node}/p/starts"] == 3


def test_base_exception_in_on_start_is_a_crash(runtime, recorder):
    """SystemExit raised by on_start is reported like any crash, not lost in a dying thread."""
    sup = start(runtime, ChildSpec("p", Probe, config={"base_exception_on_start": True}), intensity=2, period=60)
    recorder.wait_for("supervisor_escalated")
    crashes = recorder.matching("child_crashed", child_id="p")
    assert [c["exc_type"] for c in crashes] == ["SystemExit"] * 3
    sup.finished.wait(WAIT)


class Unbuildable(Actor):
    """Its constructor fails: the supervisor sees a crash, not an exception of its own."""

    def __init__(self, ctx):
        raise LookupError("cannot build")


def test_factory_exception_is_a_child_crash(runtime, recorder):
    """A child whose constructor raises is a crashed child, counted towards the intensity."""
    start(runtime, ChildSpec("u", Unbuildable), intensity=3, period=60)
    recorder.wait_for("supervisor_escalated")
    assert len(recorder.matching("child_crashed", child_id="u", exc_type="LookupError")) == 4


def test_ask_that_crashes_the_handler_gets_actor_crashed_at_once(runtime, recorder):
    """The asker learns of the crash from a FAULT reply, not from its timeout."""
    start(runtime, ChildSpec("p", Probe))
    with pytest.raises(ActorCrashed) as info:
        ask(runtime, "p", Crash("exception"), timeout=WAIT)
    assert info.value.exc_type == "RuntimeError" and info.value.actor == "p"


def test_children_start_in_order_and_stop_in_reverse(runtime, recorder):
    """OTP order: start a, b, c; stop c, b, a."""
    sup = start(runtime, ChildSpec("a", Probe), ChildSpec("b", Probe), ChildSpec("c", Probe))
    recorder.wait_for("child_started", count=3)
    sup.actor_ref.stop(timeout=WAIT)
    started = [e["child_id"] for e in recorder.matching("child_started")]
    stopped = [e["child_id"] for e in recorder.matching("child_stopped", reason="shutdown")]
    assert started == ["a", "b", "c"] and stopped == ["c", "b", "a"]


def test_one_for_all_restarts_every_child(runtime, recorder):
    """One crash under one_for_all gives every child a new instance."""
    start(runtime, ChildSpec("a", Probe), ChildSpec("b", Probe), ChildSpec("c", Probe), strategy="one_for_all")
    before = {n: instance_of(runtime, n) for n in "abc"}
    runtime.bus.client().tell("b", Crash("exception"))
    recorder.wait_for("child_restarted", count=3)
    after = {n: instance_of(runtime, n) for n in "abc"}
    assert all(before[n] != after[n] for n in "abc")
    assert [e["child_id"] for e in recorder.matching("child_stopped")] == ["c", "a"]


def test_rest_for_one_restarts_later_children_only(runtime, recorder):
    """A crash of b under rest_for_one restarts b and c, never a."""
    start(runtime, ChildSpec("a", Probe), ChildSpec("b", Probe), ChildSpec("c", Probe), strategy="rest_for_one")
    before = {n: instance_of(runtime, n) for n in "abc"}
    runtime.bus.client().tell("b", Crash("exception"))
    recorder.wait_for("child_restarted", count=2)
    after = {n: instance_of(runtime, n) for n in "abc"}
    assert before["a"] == after["a"] and before["b"] != after["b"] and before["c"] != after["c"]


def test_transient_child_is_restarted_after_a_crash_but_not_after_a_normal_stop(runtime, recorder):
    """transient: a crash brings it back, stopping itself does not."""
    start(runtime, ChildSpec("t", Probe, restart="transient"))
    runtime.bus.client().tell("t", Crash("exception"))
    recorder.wait_for("child_restarted", child_id="t")
    runtime.bus.client().tell("t", StopSelf())
    recorder.wait_for("child_stopped", child_id="t", reason="normal")
    with pytest.raises(AskTimeout):
        ask(runtime, "t", Ping(1), timeout=0.3)
    assert len(recorder.matching("child_restarted", child_id="t")) == 1


def test_permanent_child_is_restarted_even_after_stopping_itself(runtime, recorder):
    """permanent: any end, even a normal one, is followed by a restart."""
    start(runtime, ChildSpec("p", Probe))
    runtime.bus.client().tell("p", StopSelf())
    recorder.wait_for("child_restarted", child_id="p")
    assert isinstance(ask(runtime, "p", Ping(1)), Pong)


def test_temporary_child_is_never_restarted_and_its_mailbox_goes(runtime, recorder):
    """temporary: after a crash the child is forgotten, and its name leaves the bus."""
    sup = start(runtime, ChildSpec("tmp", Probe, restart="temporary"), ChildSpec("other", Probe))
    runtime.bus.client().tell("tmp", Crash("exception"))
    recorder.wait_for("child_crashed", child_id="tmp")
    assert [c["id"] for c in which_children(sup.actor_ref)] == ["other"]
    assert not runtime.bus.has("tmp")
    assert recorder.matching("child_restarted") == []


def test_intensity_exceeded_stops_children_in_reverse_and_escalates_to_the_parent(runtime, recorder):
    """More restarts than allowed: the inner supervisor stops its children, fails, and its parent restarts it."""
    inner = SupervisorSpec("inner", [ChildSpec("a", Probe), ChildSpec("b", Probe)], intensity=1, period=60)
    start(runtime, inner, ChildSpec("sibling", Probe), intensity=5, period=60)
    recorder.wait_for("child_started", count=4)
    client = runtime.bus.client()
    client.tell("b", Crash("exception"))
    recorder.wait_for("child_restarted", child_id="b")
    client.tell("b", Crash("exception"))
    exceeded = recorder.wait_for("restart_intensity_exceeded")[0]
    assert exceeded["supervisor"] == "inner" and exceeded["child_id"] == "b" and exceeded["restarts"] == 2
    escalated = recorder.wait_for("supervisor_escalated")[0]
    assert escalated["parent"] == "root" and "inner" in escalated["reason"]
    crashed = recorder.wait_for("child_crashed", child_id="inner")[0]
    assert crashed["exc_type"] == "RestartIntensityExceeded"
    recorder.wait_for("child_restarted", child_id="inner")
    inner_stops = [e["child_id"] for e in recorder.matching("child_stopped", supervisor="inner")]
    assert inner_stops[-1:] == ["a"]
    assert isinstance(ask(runtime, "b", Ping(1)), Pong)
    assert recorder.matching("child_crashed", child_id="sibling") == []


def test_backoff_delays_the_restart_and_messages_wait_for_the_new_instance(runtime, recorder):
    """With a backoff the restart waits for a timer; a message sent meanwhile reaches the new instance."""
    start(runtime, ChildSpec("p", Probe, backoff=Backoff(initial=0.2, maximum=0.2, jitter=0)))
    client = runtime.bus.client()
    client.tell("p", Crash("exception"))
    recorder.wait_for("child_crashed", child_id="p")
    client.tell("p", Seq(41))
    restarted = recorder.wait_for("child_restarted", child_id="p")[0]
    assert restarted["backoff_s"] == pytest.approx(0.2)
    assert isinstance(ask(runtime, "p", Ping(1)), Pong)
    assert RECEIVED[f"{runtime.bus.node}/p"] == [41]


def test_child_that_does_not_stop_within_its_shutdown_is_abandoned(runtime, recorder):
    """A thread stuck in a handler gets its shutdown seconds, then child_stopped says timeout."""
    sup = start(runtime, ChildSpec("stuck", Probe, shutdown=0.2))
    runtime.bus.client().tell("stuck", Crash("hang"))
    ask_done = threading.Event()
    threading.Thread(target=lambda: (sup.actor_ref.stop(timeout=WAIT), ask_done.set()), daemon=True).start()
    try:
        stopped = recorder.wait_for("child_stopped", child_id="stuck")[0]
        assert stopped["reason"] == "timeout"
        assert ask_done.wait(WAIT)
    finally:
        RELEASE.set()


def test_messages_to_a_restarting_actor_are_delivered_to_the_new_instance_under_a_restart_storm(runtime, recorder):
    """2,000 numbered messages interleaved with 100 crashes: every number arrives once, in order."""
    start(runtime, ChildSpec("p", Probe), intensity=1000, period=60)
    client = runtime.bus.client()
    for i in range(2000):
        client.tell("p", Seq(i))
        if i % 20 == 19:
            client.tell("p", Crash("exception"))
    ask(runtime, "p", Ping(0))
    recorder.wait_for("child_restarted", count=100, child_id="p")
    assert RECEIVED[f"{runtime.bus.node}/p"] == list(range(2000))


def test_supervision_log_is_json_lines_with_the_contract_keys(runtime, recorder):
    """The log file holds one JSON object per event, in order, with exactly the documented keys."""
    sup = start(runtime, ChildSpec("p", Probe), intensity=1, period=60)
    runtime.bus.client().tell("p", Crash("exception"))
    recorder.wait_for("child_restarted")
    runtime.bus.client().tell("p", Crash("exception"))
    recorder.wait_for("supervisor_escalated")
    sup.finished.wait(WAIT)
    every = [json.loads(line) for line in Path(runtime.log.path).read_text(encoding="utf-8").splitlines()]
    from villagemesh.supervision.log import SUPERVISION_EVENTS

    assert every[0]["event"] == "supervisor_started"  # informative (the dashboard's tree), not the contract
    assert (every[0]["strategy"], every[0]["intensity"], every[0]["period_s"]) == ("one_for_one", 1, 60)
    lines = [e for e in every if e["event"] in SUPERVISION_EVENTS]
    assert [e["event"] for e in lines] == [
        "child_started",
        "child_crashed",
        "child_started",
        "child_restarted",
        "child_crashed",
        "restart_intensity_exceeded",
        "supervisor_escalated",
    ]
    common = {"event", "level", "node", "timestamp"}
    for e in lines:
        assert set(e) == common | SUPERVISION_EVENTS[e["event"]], e["event"]
        assert e["node"] == runtime.bus.node and e["timestamp"].endswith("Z")
    assert lines[2]["restart_count"] == 1 and lines[3]["backoff_s"] == 0.0
    assert lines[1]["instance"] == lines[0]["instance"] != lines[2]["instance"]


def test_which_children_reports_each_child(runtime, recorder):
    """Introspection lists children in start order with their state."""
    sup = start(runtime, ChildSpec("a", Probe), SupervisorSpec("s", [ChildSpec("b", Probe)]))
    recorder.wait_for("child_started", count=3)
    rows = which_children(sup.actor_ref)
    assert [(r["id"], r["kind"], r["alive"]) for r in rows] == [("a", "worker", True), ("s", "supervisor", True)]
    assert sup.child_ref("nope") is None
    assert sup.child_ref("a") is not None


def test_launch_returns_once_every_childs_mailbox_is_open_as_start_link_does(runtime, monkeypatch):
    """A tell right after launch is queued for the child, even when the supervisor's thread is slow to
    run its on_start (before, launch returned at once and such a tell could raise NoSuchActor)."""
    import time

    slow = threading.Event()
    on_start = Supervisor.on_start

    def late(self):
        slow.set()
        time.sleep(0.2)  # the supervisor's thread loses the race to the launching thread
        on_start(self)

    monkeypatch.setattr(Supervisor, "on_start", late)
    nested = SupervisorSpec("inner", [ChildSpec("q", Probe)], intensity=10)
    start(runtime, ChildSpec("p", Probe), nested)
    assert slow.is_set()
    client = runtime.bus.client()
    client.tell("p", Seq(1))
    client.tell("q", Seq(1))  # a nested supervisor's child too
    assert instance_of(runtime, "p") and instance_of(runtime, "q")
