"""The fork server: a fresh single-threaded interpreter that forks children and reports their deaths at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import WAIT
from villagemesh.errors import ConfigError, SupervisionError
from villagemesh.supervision.forkserver import ForkServer

pytestmark = pytest.mark.slow

T = "tests.supervision._fork_targets"


@pytest.fixture
def server():
    with ForkServer.start(preload=(T,)) as srv:
        yield srv


def read_pid(path, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            pid, threads = path.read_text().split()
            return int(pid), int(threads)
        time.sleep(0.005)
    raise AssertionError(f"child never wrote {path}")


def test_a_killed_child_is_reported_with_its_signal_at_once(server, tmp_path):
    """kill -9 of a child: the exit notice carries -9; the next fork answers."""
    out = tmp_path / "pid"
    pid = server.fork(f"{T}:write_pid", str(out).encode())
    assert read_pid(out)[0] == pid
    os.kill(pid, signal.SIGKILL)
    ended = server.wait_exit(pid, WAIT)
    assert ended is not None and ended.returncode == -signal.SIGKILL
    out2 = tmp_path / "pid2"
    pid2 = server.fork(f"{T}:write_pid", str(out2).encode())
    assert read_pid(out2)[0] == pid2 != pid


def test_children_start_from_a_single_threaded_server_not_the_caller(server, tmp_path):
    """The child was forked from the server (one thread), not from this multi-threaded test process."""
    out = tmp_path / "pid"
    pid = server.fork(f"{T}:write_pid", str(out).encode())
    _, threads = read_pid(out)
    assert threads == 1
    assert os.getppid() != pid
    with open(f"/proc/{pid}/stat") as stat:
        assert int(stat.read().split(")")[1].split()[1]) == server.pid  # the child's parent is the server


@pytest.mark.parametrize(
    ("target", "arg", "code"), [("raise_error", b"x", 1), ("segfault", b"", -11), ("exit_with", b"7", 7)]
)
def test_every_kind_of_child_death_is_reported_with_its_status(server, target, arg, code):
    """A Python exception exits 1 (traceback on stderr), a segfault -11, an explicit exit its status."""
    pid = server.fork(f"{T}:{target}", arg)
    ended = server.wait_exit(pid, WAIT)
    assert ended is not None and ended.returncode == code


def test_a_bad_target_is_refused_naming_it(server):
    """Targets that are not 'module:function' or cannot be imported are ConfigErrors; the server lives on."""
    with pytest.raises(ConfigError, match="module:function"):
        server.fork("no_colon", b"")
    with pytest.raises(ConfigError, match="no_such_module"):
        server.fork("no_such_module:f", b"")
    with pytest.raises(ConfigError, match="not callable"):
        server.fork(f"{T}:not_callable", b"")
    assert server.wait_exit(server.fork(f"{T}:exit_with", b"0"), WAIT).returncode == 0


def test_closing_the_server_kills_its_children(tmp_path):
    """close() leaves no child behind."""
    srv = ForkServer.start(preload=(T,))
    out = tmp_path / "pid"
    pid = srv.fork(f"{T}:write_pid", str(out).encode())
    read_pid(out)
    srv.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(SupervisionError, match="closed"):
        srv.fork(f"{T}:exit_with", b"0")


def test_when_the_node_dies_the_server_and_its_children_die_too(tmp_path):
    """kill -9 of the process that owns the server: the server sees EOF and kills its children."""
    script = tmp_path / "owner.py"
    out = tmp_path / "pid"
    script.write_text(
        "import sys, threading\n"
        f"sys.path.insert(0, {os.getcwd()!r})\n"
        "from villagemesh.supervision.forkserver import ForkServer\n"
        f"srv = ForkServer.start(preload=({T!r},))\n"
        f"srv.fork('{T}:write_pid', {str(out)!r}.encode())\n"
        "print(srv.pid, flush=True)\n"
        "threading.Event().wait(60)\n"
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    server_pid = int(owner.stdout.readline())
    child_pid, _ = read_pid(out)
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + WAIT
    gone = set()
    while time.monotonic() < deadline and len(gone) < 2:
        for pid in (server_pid, child_pid):
            try:
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat") as stat:
                    if stat.read().split(")")[1].split()[0] == "Z":
                        gone.add(pid)
            except (ProcessLookupError, FileNotFoundError):
                gone.add(pid)
        time.sleep(0.01)
    assert gone == {server_pid, child_pid}


def test_warm_targets_are_served_by_a_prepared_spare_and_a_new_spare_follows(tmp_path):
    """A warm target runs in a child that was forked and prepared before the request; each fork gets one."""
    target = f"{T}:report_prepared"
    with ForkServer.start(preload=(T,), warm=(target,)) as srv:
        pids = []
        for i in range(3):
            out = tmp_path / f"out{i}"
            pid = srv.fork(target, str(out).encode())
            assert srv.wait_exit(pid, WAIT).returncode == 0
            child, prepared_in = map(int, out.read_text().split())
            assert child == pid == prepared_in  # prepare ran in this very process, before its assignment
            pids.append(pid)
        assert len(set(pids)) == 3
