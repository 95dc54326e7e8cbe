"""Process-isolated children: the same actor class in a forked process, restarted on any death."""

from __future__ import annotations

import os
import signal
import socket
import threading

import pytest

from tests.conftest import WAIT
from tests.supervision._actors import Adopter, Crash, Ping, Pong, Probe, Report, Seq
from villagemesh.errors import ActorCrashed
from villagemesh.supervision.spec import ChildSpec, SupervisorSpec
from villagemesh.supervision.supervisor import Supervisor

pytestmark = pytest.mark.slow


@pytest.fixture
def process_runtime(runtime):
    from villagemesh.supervision.process import ProcessLauncher

    launcher = ProcessLauncher(preload=("tests.supervision._actors",))
    runtime.process_launcher = lambda: launcher
    yield runtime
    import pykka

    pykka.ActorRegistry.stop_all(block=True, timeout=5)
    launcher.close()


def start(env, *children, **kwargs):
    kwargs.setdefault("intensity", 100)
    kwargs.setdefault("period", 60)
    return Supervisor.launch(SupervisorSpec("root", list(children), **kwargs), env)


def ask(env, name, msg, timeout=WAIT):
    return env.bus.client().ask(name, msg, timeout=timeout)


def test_a_process_child_answers_from_another_process(process_runtime, recorder):
    """The actor runs in its own process and answers asks through the node's bus."""
    start(process_runtime, ChildSpec("p", Probe, isolation="process"))
    pong = ask(process_runtime, "p", Ping(1))
    assert isinstance(pong, Pong) and pong.n == 2
    assert pong.pid != os.getpid()
    started = recorder.wait_for("child_started", child_id="p")[0]
    assert started["isolation"] == "process" and started["pid"] == pong.pid


@pytest.mark.parametrize(
    ("how", "exc_type"),
    [
        ("kill9", "ChildProcessDied"),
        ("segfault", "ChildProcessDied"),
        ("exit", "ChildProcessDied"),
        ("exception", "RuntimeError"),
    ],
)
def test_any_death_of_the_child_process_leaves_the_node_serving_and_the_child_back(
    process_runtime, recorder, how, exc_type
):
    """kill -9, a segfault, os._exit and a Python exception each end in a new child process."""
    start(process_runtime, ChildSpec("p", Probe, isolation="process"), ChildSpec("t", Probe))
    first = ask(process_runtime, "p", Ping(1)).pid
    if how == "kill9":
        os.kill(first, signal.SIGKILL)
    else:
        process_runtime.bus.client().tell("p", Crash(how))
    crashed = recorder.wait_for("child_crashed", child_id="p")[0]
    assert crashed["exc_type"] == exc_type
    if how == "kill9":
        assert "SIGKILL" in crashed["exc_message"]
    if how == "segfault":
        assert "SIGSEGV" in crashed["exc_message"]
    recorder.wait_for("child_restarted", child_id="p")
    second = ask(process_runtime, "p", Ping(1)).pid
    assert second != first
    assert isinstance(ask(process_runtime, "t", Ping(1)), Pong)  # the node kept serving


def test_an_ask_whose_handler_kills_the_process_gets_actor_crashed_at_once(process_runtime, recorder):
    """The host answers for a child that died mid-request: the asker does not wait for its timeout."""
    start(process_runtime, ChildSpec("p", Probe, isolation="process"))
    with pytest.raises(ActorCrashed, match=r"ChildProcessDied|died"):
        ask(process_runtime, "p", Crash("segfault"), timeout=WAIT)


def test_messages_queued_behind_a_killed_child_reach_the_next_one_in_order(process_runtime, recorder):
    """Frames the dead child had not acknowledged go to the new child, in order; none is lost."""
    start(process_runtime, ChildSpec("p", Probe, isolation="process"))
    first = ask(process_runtime, "p", Ping(0)).pid
    client = process_runtime.bus.client()
    client.tell("p", Crash("exit"))
    for i in range(300):
        client.tell("p", Seq(i))
    recorder.wait_for("child_restarted", child_id="p")
    assert ask(process_runtime, "p", Ping(0)).pid != first
    assert ask(process_runtime, "p", Report()).numbers == tuple(range(300))


def test_process_child_log_events_reach_the_node_log(process_runtime, recorder):
    """Events a process child emits arrive in the node's log, tagged with its pid."""
    from villagemesh.actors.core.bus import Kind, encode_frame

    start(process_runtime, ChildSpec("p", Probe, isolation="process"))
    pid = ask(process_runtime, "p", Ping(0)).pid
    process_runtime.bus.client().send_frame("p", encode_frame(Kind.REPLY, 1, None, Ping(1)))
    rejected = recorder.wait_for("message_rejected", actor="p")[0]
    assert rejected["child_pid"] == pid


def test_stopping_the_supervisor_stops_the_child_process(process_runtime, recorder):
    """A graceful stop reaches the child; its process is gone afterwards."""
    sup = start(process_runtime, ChildSpec("p", Probe, isolation="process"))
    pid = ask(process_runtime, "p", Ping(0)).pid
    sup.actor_ref.stop(timeout=WAIT)
    stopped = recorder.wait_for("child_stopped", child_id="p")[0]
    assert stopped["reason"] == "shutdown"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


class RefillCalls:
    """Counts a launcher's ``refill`` calls (they still reach the fork server); ``first`` is set at the first."""

    def __init__(self, launcher) -> None:
        self.count = 0
        self.first = threading.Event()
        self._refill = launcher.refill

    def __call__(self) -> None:
        self.count += 1
        self.first.set()
        self._refill()


def test_a_new_child_asks_for_the_next_spare_once_after_its_first_answer(process_runtime, monkeypatch):
    """The next spare is forked after the child's first acknowledgement, not during its start, and once."""
    from villagemesh.supervision import process

    monkeypatch.setattr(process, "REFILL_AFTER", 3600.0)  # only the acknowledgement can ask
    launcher = process_runtime.process_launcher()
    calls = RefillCalls(launcher)
    monkeypatch.setattr(launcher, "refill", calls)
    start(process_runtime, ChildSpec("p", Probe, isolation="process"))
    for i in range(3):
        ask(process_runtime, "p", Ping(i))
    assert calls.first.wait(WAIT)
    ask(process_runtime, "p", Ping(9))
    assert calls.count == 1


def test_a_new_child_that_gets_no_message_still_asks_for_the_next_spare(process_runtime, monkeypatch):
    """Without a frame to acknowledge, the host asks REFILL_AFTER seconds after the child's hello."""
    from villagemesh.supervision import process

    monkeypatch.setattr(process, "REFILL_AFTER", 0.01)
    launcher = process_runtime.process_launcher()
    calls = RefillCalls(launcher)
    monkeypatch.setattr(launcher, "refill", calls)
    start(process_runtime, ChildSpec("p", Probe, isolation="process"))
    assert calls.first.wait(WAIT)


def test_a_rehearsal_takes_a_spare_through_a_first_request_and_leaves_its_context_open():
    """The warm spare's dry run (an actor started, asked, stopped) completes and keeps the prepared Context."""
    import zmq

    from villagemesh.supervision.process import _prepare_child, _rehearse

    prepared = _prepare_child()
    try:
        _rehearse(prepared)
        probe = prepared.zctx.socket(zmq.PAIR)  # the Context still works
        probe.close(linger=0)
    finally:
        prepared.scheduler.close()
        prepared.zctx.destroy(linger=0)


def test_restarted_hosts_leave_nothing_behind(process_runtime, recorder):
    """Each ended host closes its sockets and removes its control socket file: after many restarts
    the launcher's folder holds the current child's files only (a leak here once stopped a node's
    restarts after about a thousand, at zmq's socket limit)."""
    start(process_runtime, ChildSpec("p", Probe, isolation="process"))
    launcher = process_runtime.process_launcher()
    pid = ask(process_runtime, "p", Ping(0)).pid
    for _ in range(20):
        os.kill(pid, signal.SIGKILL)
        new = ask(process_runtime, "p", Ping(0)).pid
        assert new != pid
        pid = new
    controls = [name for name in os.listdir(launcher._dir) if name.endswith(".ctl")]
    assert len(controls) == 1


def test_a_failed_fork_is_a_crash_of_the_child_and_leaves_no_file(process_runtime, recorder, monkeypatch):
    """A fork the server refuses crashes that child (the supervisor retries); its host's files are gone."""
    from villagemesh.errors import SupervisionError

    launcher = process_runtime.process_launcher()
    real_fork = launcher.fork
    calls = []

    def refuse_once(arg: bytes) -> int:
        calls.append(arg)
        if len(calls) == 1:
            raise SupervisionError("fork server refused (test)")
        return real_fork(arg)

    monkeypatch.setattr(launcher, "fork", refuse_once)
    start(process_runtime, ChildSpec("p", Probe, isolation="process"))
    crashed = recorder.wait_for("child_crashed", child_id="p")[0]
    assert crashed["exc_type"] == "SupervisionError"
    assert isinstance(ask(process_runtime, "p", Ping(0)), Pong)  # the retry worked
    assert len([n for n in os.listdir(launcher._dir) if n.endswith(".ctl")]) == 1


def test_asking_for_a_spare_once_the_fork_server_is_gone_is_harmless():
    """A host whose child says hello while the node stops finds the fork server closed: nothing to do."""
    from villagemesh.supervision.process import ProcessLauncher

    launcher = ProcessLauncher()
    launcher.close()
    launcher.refill()


def test_a_process_child_adopts_a_connection_handed_off_by_the_node(process_runtime, recorder):
    """The descriptor crosses to the child (SCM_RIGHTS): it reads the rest after the peeked bytes and answers."""
    from villagemesh.actors.core.transport import ConnectionHandedOff

    start(process_runtime, ChildSpec("adopter", Adopter, isolation="process"))
    for n in range(3):
        ours, theirs = socket.socketpair()
        ours.settimeout(WAIT)
        ours.sendall(b"llo %d\n" % n)
        process_runtime.bus.client().tell("adopter", ConnectionHandedOff("secure", theirs.detach(), b"he", "test"))
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = ours.recv(100)
            assert chunk, f"the child closed without answering (got {answer!r})"
            answer += chunk
        pid, text = answer.split(b" ", 1)
        assert int(pid) != os.getpid() and text == b"hello %d\n" % n
        ours.close()


def test_a_hand_off_whose_descriptor_is_gone_is_dropped_and_logged(process_runtime, recorder):
    """fd -1 (what a hand-off handed back after its child's death carries) is never sent on: logged, dropped."""
    from villagemesh.actors.core.transport import ConnectionHandedOff

    start(process_runtime, ChildSpec("adopter", Adopter, isolation="process"))
    process_runtime.bus.client().tell("adopter", ConnectionHandedOff("secure", -1, b"", "peer-x"))
    [event] = recorder.wait_for("connection_handoff_lost", peer="peer-x")
    assert "handed back" in event["reason"]
    assert recorder.matching("child_crashed", child_id="adopter") == []
