"""The fork server: a fresh single-threaded interpreter that forks children and reports their deaths at once."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import WAIT
from villagemesh.errors import ChildSpecError, ConfigError, SupervisionError
from villagemesh.supervision import forkserver
from villagemesh.supervision.forkserver import HEADER, MAX_FRAME, ChildExit, ForkServer, FrameReader, encode_frame

T = "tests.supervision._fork_targets"


class Reports:
    """An abstract Unix socket children report to; ``next()`` waits for one report (an event, not a sleep)."""

    def __init__(self) -> None:
        self.name = f"villagemesh-test-{uuid.uuid4().hex}".encode()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(b"\0" + self.name)
        self.listener.listen(16)
        self.listener.settimeout(WAIT)
        self.conns: list[socket.socket] = []

    def next(self) -> list[int]:
        conn, _ = self.listener.accept()
        conn.settimeout(WAIT)
        self.conns.append(conn)
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(100)
            assert chunk, "a child hung up before reporting"
            line += chunk
        return [int(v) for v in line.split()]

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.listener.close()


@pytest.fixture
def reports() -> Iterator[Reports]:
    r = Reports()
    yield r
    r.close()


@pytest.fixture
def server() -> Iterator[ForkServer]:
    with ForkServer.start(preload=(T,)) as srv:
        yield srv


def ended(pid: int) -> bool:
    """Wait (bounded) on a pidfd of ``pid``, which is readable once it ended: True if it did."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], WAIT)[0])
    finally:
        os.close(pidfd)


# -- the channel's frames (pure) ----------------------------------------------------------------

frames = st.lists(
    st.tuples(st.sampled_from(["fork", "forked", "exited"]), st.integers(0, 2**31), st.binary(max_size=64)).map(list),
    max_size=8,
)


@given(frames, st.data())
def test_frames_survive_any_chunking(batch, data):
    """Encoded frames cut anywhere decode to the same frames, in order."""
    wire = b"".join(encode_frame(f) for f in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    reader, out = FrameReader(), []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        out += reader.feed(wire[start:end])
    assert out == batch


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_only_supervision_error(data):
    """Garbage on the channel is a SupervisionError, never another exception."""
    try:
        FrameReader().feed(data)
    except SupervisionError:
        return


def test_an_oversized_length_is_rejected_before_its_body_arrives():
    """A length above MAX_FRAME is refused from the header alone."""
    with pytest.raises(SupervisionError, match=str(MAX_FRAME + 1)):
        FrameReader().feed(HEADER.pack(MAX_FRAME + 1))


def test_a_frame_that_is_not_a_tagged_array_is_rejected():
    """Only msgpack arrays that start with a string tag are frames."""
    body = msgpack.packb({"fork": 1})
    with pytest.raises(SupervisionError, match="tagged array"):
        FrameReader().feed(HEADER.pack(len(body)) + body)


# -- real processes ----------------------------------------------------------------------------

pytestmark = pytest.mark.slow


def test_a_killed_child_is_reported_with_minus_nine_and_the_next_fork_answers(server, reports):
    """kill -9 of a child: the exit notice carries -9 (no polling), and a new fork reports in."""
    pid = server.fork(f"{T}:report", reports.name)
    assert reports.next()[0] == pid
    os.kill(pid, signal.SIGKILL)
    assert server.wait_exit(pid, WAIT) == ChildExit(pid, -signal.SIGKILL)
    pid2 = server.fork(f"{T}:report", reports.name)
    assert reports.next()[0] == pid2 != pid


def test_a_child_talks_zmq_to_a_threaded_caller_and_its_replacement_does_too(server):
    """The caller has a Context and threads; children connect over ipc:// and answer; after kill -9 too."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    address = f"ipc://@villagemesh-test-{uuid.uuid4().hex}"
    router.bind(address)
    try:
        for _ in range(2):
            pid = server.fork(f"{T}:zmq_hello", address.encode())
            assert router.poll(WAIT * 1000)
            identity, kind, said = router.recv_multipart()
            assert (kind, int(said)) == (b"hello", pid)
            router.send_multipart([identity, b"ping"])
            assert router.poll(WAIT * 1000)
            assert router.recv_multipart() == [identity, b"pong", str(pid).encode()]
            os.kill(pid, signal.SIGKILL)
            assert server.wait_exit(pid, WAIT).returncode == -signal.SIGKILL
    finally:
        router.close()
        ctx.term()


@pytest.mark.parametrize(
    ("target", "arg", "code"),
    [("raise_error", b"x", 1), ("segfault", b"", -signal.SIGSEGV), ("exit_with", b"7", 7), ("sys_exit", b"3", 3)],
)
def test_every_kind_of_child_death_is_reported_with_its_status(server, target, arg, code):
    """An exception exits 1 (traceback on stderr), a segfault -11, an exit its status; the caller is unharmed."""
    pid = server.fork(f"{T}:{target}", arg)
    assert server.wait_exit(pid, WAIT) == ChildExit(pid, code)
    assert server.wait_exit(server.fork(f"{T}:exit_with", b"0"), WAIT).returncode == 0


def test_the_server_is_one_thread_and_the_parent_of_every_child(server, reports):
    """The server has exactly one thread (so no zmq Context either); children are its own, not the caller's."""
    assert os.listdir(f"/proc/{server.pid}/task") == [str(server.pid)]
    pid = server.fork(f"{T}:report", reports.name)
    child, parent, threads = reports.next()
    assert (child, parent, threads) == (pid, server.pid, 1)


def test_a_bad_target_is_refused_naming_it_and_the_server_lives_on(server):
    """Malformed, unimportable, missing or uncallable targets are ChildSpecErrors naming them."""
    for target, reason in [
        ("no_colon", "package.module:function"),
        ("no_such_module:f", "No module named 'no_such_module'"),
        (f"{T}:missing", "no attribute 'missing'"),
        (f"{T}:not_callable", "not callable"),
    ]:
        with pytest.raises(ChildSpecError, match=reason) as info:
            server.fork(target, b"")
        assert target in str(info.value)
    with pytest.raises(ConfigError, match="bytes"):
        server.fork(f"{T}:exit_with", "0")  # type: ignore[arg-type]
    assert server.wait_exit(server.fork(f"{T}:exit_with", b"0"), WAIT).returncode == 0


def test_exit_notices_wake_a_poller_even_when_another_thread_read_them(server):
    """fileno() is readable while exits are unread, whoever took them off the channel; read_exits drains."""
    pid = server.fork(f"{T}:exit_with", b"5")
    assert server.wait_exit(pid, WAIT).returncode == 5  # this read took the notice off the socket
    assert select.select([server], [], [], WAIT)[0] == [server]
    assert server.read_exits() == [ChildExit(pid, 5)]
    assert select.select([server], [], [], 0)[0] == []
    assert server.read_exits() == []

    pid2 = server.fork(f"{T}:exit_with", b"6")
    assert select.select([server], [], [], WAIT)[0] == [server]  # woken by the channel itself
    exits = server.read_exits()
    while not exits:  # a fork reply may have woken the poll first; the exit follows
        assert select.select([server], [], [], WAIT)[0]
        exits = server.read_exits()
    assert exits == [ChildExit(pid2, 6)]


def test_kill_signals_a_live_child_by_pidfd_and_reports_false_once_it_ended(server, reports):
    """kill() reaches the child through the server's pidfd; after its exit it is a no-op that says so."""
    pid = server.fork(f"{T}:report", reports.name)
    reports.next()
    assert server.kill(pid, signal.SIGTERM) is True
    assert server.wait_exit(pid, WAIT).returncode == -signal.SIGTERM
    assert server.kill(pid) is False
    assert server.kill(1) is False  # not ours: never signalled


def test_concurrent_forks_from_many_threads_each_get_their_own_child(server):
    """Replies and exit notices share one channel; many threads forking and waiting never mix them up."""
    results: dict[int, ChildExit] = {}
    errors: list[BaseException] = []

    def work(status: int) -> None:
        try:
            for _ in range(5):
                pid = server.fork(f"{T}:exit_with", str(status).encode())
                results[pid] = server.wait_exit(pid, WAIT)
                assert results[pid].returncode == status
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=work, args=(s,)) for s in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not errors
    assert len(results) == 20


def test_closing_the_server_kills_its_children_and_later_requests_fail(reports):
    """close() kills every child (their exits are known after it) and the handle refuses more work."""
    srv = ForkServer.start(preload=(T,))
    pid = srv.fork(f"{T}:report", reports.name)
    reports.next()
    srv.close()
    assert ended(pid) and ended(srv.pid)
    assert srv.wait_exit(pid, 0).returncode == -signal.SIGKILL
    with pytest.raises(SupervisionError, match="closed"):
        srv.fork(f"{T}:exit_with", b"0")
    srv.close()  # idempotent


def test_a_dead_server_is_a_supervision_error_naming_it(reports):
    """kill -9 of the server: requests and waits raise SupervisionError with its pid; its children die too."""
    srv = ForkServer.start(preload=(T,))
    try:
        pid = srv.fork(f"{T}:report", reports.name)
        reports.next()
        os.kill(srv.pid, signal.SIGKILL)
        assert ended(pid)  # PR_SET_PDEATHSIG
        with pytest.raises(SupervisionError, match=f"pid {srv.pid}"):
            srv.wait_exit(pid, WAIT)
        with pytest.raises(SupervisionError, match=f"pid {srv.pid}"):
            srv.fork(f"{T}:exit_with", b"0")
    finally:
        srv.close()


def test_when_the_node_dies_the_server_and_its_children_die_too(reports, tmp_path):
    """kill -9 of the process that owns the server: the server reads EOF, kills its children and exits."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, threading\n"
        f"sys.path.insert(0, {os.getcwd()!r})\n"
        "from villagemesh.supervision.forkserver import ForkServer\n"
        f"srv = ForkServer.start(preload=({T!r},))\n"
        f"srv.fork('{T}:report', {reports.name!r})\n"
        "print(srv.pid, flush=True)\n"
        "threading.Event().wait(60)\n"
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(owner.stdout.readline())
        child_pid = reports.next()[0]
        owner.kill()
        owner.wait()
        assert ended(server_pid) and ended(child_pid)
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()


def test_a_module_that_starts_threads_at_import_stops_all_forking():
    """Importing a thread-starting module makes the server unsafe to fork: it refuses from then on."""
    with ForkServer.start(preload=(T,)) as srv:
        with pytest.raises(SupervisionError, match="started 1 thread"):
            srv.fork("tests.supervision._threaded_module:run", b"")
        with pytest.raises(SupervisionError, match="no longer safe"):
            srv.fork(f"{T}:exit_with", b"0")
    with pytest.raises(ConfigError, match="started 1 thread"):
        ForkServer.start(preload=("tests.supervision._threaded_module",))


def test_warm_targets_are_served_by_a_prepared_spare_and_a_new_spare_follows(reports):
    """A warm target runs in a child forked and prepared before the request; each fork gets a fresh one."""
    target = f"{T}:report_prepared"
    with ForkServer.start(preload=(T,), warm=(target,)) as srv:
        pids = []
        for _ in range(3):
            pid = srv.fork(target, reports.name)
            child, prepared_in = reports.next()
            assert child == pid == prepared_in  # prepare ran in this very process, before its assignment
            assert srv.wait_exit(pid, WAIT).returncode == 0
            pids.append(pid)
        assert len(set(pids)) == 3


def test_a_spare_that_dies_unassigned_is_never_reported_and_the_next_fork_still_works(reports):
    """Spares are invisible: killing one reports nothing, and the next request is served (cold)."""
    target = f"{T}:report_prepared"
    with ForkServer.start(preload=(T,), warm=(target,)) as srv:
        spares = [int(p) for p in Path(f"/proc/{srv.pid}/task/{srv.pid}/children").read_text().split()]
        assert len(spares) == 1
        os.kill(spares[0], signal.SIGKILL)
        assert ended(spares[0])
        pid = srv.fork(target, reports.name)
        assert reports.next()[0] == pid != spares[0]
        assert srv.wait_exit(pid, WAIT).returncode == 0
        assert srv.read_exits() == [ChildExit(pid, 0)]


def spares_of(srv: ForkServer, *, besides: tuple[int, ...] = ()) -> list[int]:
    """The server's live children other than ``besides``, after a round trip (so that every
    request sent before has been handled: a refill's forks are done)."""
    srv.kill(2**22 + 1)  # no such child: only the round trip matters
    children = [int(p) for p in Path(f"/proc/{srv.pid}/task/{srv.pid}/children").read_text().split()]
    return [pid for pid in children if pid not in besides and not ended_already(pid)]


def ended_already(pid: int) -> bool:
    """True if ``pid`` has exited (a zombie not reaped yet counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_warm_target_keeps_its_spares_and_a_fork_without_refill_waits_for_refill(reports):
    """``spares`` spares wait ready; ``refill=False`` takes one and leaves the gap until ``refill()``."""
    target = f"{T}:report_prepared"
    with ForkServer.start(preload=(T,), warm=(target,), spares=2) as srv:
        first = spares_of(srv)
        assert len(first) == 2
        pid = srv.fork(target, reports.name, refill=False)
        assert pid == min(first)  # the oldest spare goes first
        assert reports.next() == [pid, pid]
        assert srv.wait_exit(pid, WAIT).returncode == 0
        assert spares_of(srv) == [max(first)]  # no new spare yet
        srv.refill(target)
        after = spares_of(srv)
        assert len(after) == 2 and max(first) in after
        srv.refill(target)  # full already: nothing more
        assert spares_of(srv) == after


def test_a_fork_that_finds_no_spare_is_cold_and_refills_at_once(reports):
    """With every spare gone, a fork is cold (``target(arg)``) and the next spare follows it anyway."""
    target = f"{T}:report_prepared"
    with ForkServer.start(preload=(T,), warm=(target,)) as srv:
        (spare,) = spares_of(srv)
        os.kill(spare, signal.SIGKILL)
        assert ended(spare)
        pid = srv.fork(target, reports.name, refill=False)
        assert reports.next() == [pid, 0]  # cold: no prepared value
        assert srv.wait_exit(pid, WAIT).returncode == 0
        assert len(spares_of(srv)) == 1


def test_a_spare_with_time_to_spare_rehearses_before_its_assignment(reports, monkeypatch):
    """A warm target's ``rehearse`` runs in the spare once its argument is late; the child sees it."""
    monkeypatch.setenv("VILLAGEMESH_TEST_REPORTS", reports.name.decode())
    target = f"{T}:report_rehearsal"
    with ForkServer.start(preload=(T,), warm=(target,)) as srv:
        spare, rehearsed = reports.next()  # the rehearsal reports itself
        assert rehearsed == 1
        pid = srv.fork(target, reports.name)
        assert pid == spare
        assert reports.next() == [pid, 1]


def test_a_spare_whose_argument_came_during_prepare_skips_the_rehearsal(reports, monkeypatch):
    """The rehearsal is for idle time only: an argument already waiting after ``prepare`` goes first."""
    monkeypatch.setenv("VILLAGEMESH_TEST_REPORTS", reports.name.decode())
    monkeypatch.setenv("VILLAGEMESH_TEST_GATE", "1")
    target = f"{T}:report_rehearsal"
    with ForkServer.start(preload=(T,), warm=(target,)) as srv:
        (spare,) = reports.next()  # its prepare waits for our go
        pid = srv.fork(target, reports.name, refill=False)  # the argument is in its pipe now
        reports.conns[-1].sendall(b"g")
        assert pid == spare
        assert reports.next() == [pid, 0]


def test_spares_must_be_a_positive_int():
    """A fork server keeps at least one spare per warm target; anything else is a ConfigError naming it."""
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ConfigError, match=f"spares must be an int >= 1, got {bad!r}"):
            ForkServer.start(spares=bad)  # type: ignore[arg-type]


def test_a_frame_whose_body_is_not_msgpack_is_rejected():
    """A well-formed length with an undecodable body is a SupervisionError."""
    with pytest.raises(SupervisionError, match="undecodable"):
        FrameReader().feed(HEADER.pack(1) + b"\xc1")


def test_unusable_start_arguments_are_config_errors_naming_them(tmp_path):
    """A bad preload name, warm target or interpreter is refused before or at start, naming it."""
    with pytest.raises(ConfigError, match="'not a module'"):
        ForkServer.start(preload=("not a module",))
    with pytest.raises(ChildSpecError, match="'no_colon'"):
        ForkServer.start(warm=("no_colon",))
    with pytest.raises(ConfigError, match="no-such-python"):
        ForkServer.start(python=str(tmp_path / "no-such-python"))
    with pytest.raises(SupervisionError, match="is gone"):
        ForkServer.start(python="/bin/false")  # starts, but is no fork server


def test_an_argument_beyond_the_frame_limit_is_refused_before_sending(server):
    """A fork argument larger than MAX_FRAME is a ConfigError; the channel is untouched."""
    with pytest.raises(ConfigError, match="exceeds"):
        server.fork(f"{T}:exit_with", b"0" * (MAX_FRAME + 1))
    assert server.wait_exit(server.fork(f"{T}:exit_with", b"0"), WAIT).returncode == 0


def test_a_fork_whose_asker_gave_up_is_killed_when_its_reply_comes_late(server, reports, monkeypatch):
    """A stuck server times a fork out; the child its late reply names is killed (nobody knows it)."""
    monkeypatch.setattr(forkserver, "REQUEST_TIMEOUT", 0.2)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        with pytest.raises(SupervisionError, match="did not answer a fork"):
            server.fork(f"{T}:report", reports.name)  # it would live until the test hangs up
    finally:
        os.kill(server.pid, signal.SIGCONT)
    exits: list[ChildExit] = []
    while not exits:
        assert select.select([server], [], [], WAIT)[0]
        exits = server.read_exits()
    assert [e.returncode for e in exits] == [-signal.SIGKILL]


def test_read_exits_raises_once_the_server_is_gone_and_its_exits_were_read(server):
    """A dead server leaves fileno() readable (EOF): read_exits says so instead of returning [] forever."""
    pid = server.fork(f"{T}:exit_with", b"4")
    assert server.wait_exit(pid, WAIT).returncode == 4
    os.kill(server.pid, signal.SIGKILL)
    assert ended(server.pid)
    assert server.read_exits() == [ChildExit(pid, 4)]
    with pytest.raises(SupervisionError, match="is gone"):
        server.read_exits()
