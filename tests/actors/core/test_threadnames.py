"""OS thread names: the short forms, and a running node's threads as the kernel lists them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from villagemesh.actors.core.threadnames import OS_NAME_BYTES, os_name


@pytest.mark.parametrize(
    ("python", "kernel"),
    [
        ("RetrierActor-2", "Retrier-2"),
        ("Libp2pActor:libp2p-loop", "Libp2p:loop"),
        ("WebSocketActor:websocket-loop", "WebSocket:loop"),
        ("LanActor:lan-loop", "Lan:loop"),
        ("Supervisor-0", "Supervisor-0"),
        ("sender-timers", "sender-timers"),
        ("ActorsActor-1", "Actors-1"),  # only the class suffix goes
        ("AVeryLongNameActor:its-own-thread", "AVeryLongName:i"),
        ("Ünïcødé-thread-name", "Ünïcødé-thr"),  # cut at 15 bytes
        ("ÜÜÜÜÜÜÜÜ", "ÜÜÜÜÜÜÜ"),  # 16 bytes: never cut inside a character
    ],
)
def test_a_python_thread_name_has_a_short_kernel_form(python, kernel):
    assert os_name(python) == kernel
    assert len(os_name(python).encode("utf-8")) <= OS_NAME_BYTES


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names are set on Linux only")
def test_a_running_nodes_threads_carry_their_names(tmp_path):
    from tests.integration._nodes import make_node, running

    node = make_node(tmp_path / "a", "a")
    with running([node]):
        names = {p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")}
    plain = {name.rstrip("0123456789") for name in names}  # pykka numbers actors process-wide
    assert {"Retrier-", "Supervisor-", "Registry-", "WebSocket:loop", "Acceptor:loop"} <= plain, sorted(names)


def test_the_c_librarys_functions_are_found_once_and_a_missing_one_is_none() -> None:
    from villagemesh.actors.core.libc import libc_function

    assert libc_function("prctl") is not None and libc_function("malloc_trim") is not None  # glibc here
    assert libc_function("no_such_function_in_any_libc") is None
