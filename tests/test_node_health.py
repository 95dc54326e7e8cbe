"""A node never lies about its health: start() is up-and-serving or a typed error with the root cause,
a failed node says so at once on every call, and every argument is checked, naming the value."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import WAIT
from villagemesh import create_network
from villagemesh.errors import ConfigError, NodeFailed, NodeStartFailed, StorageError, SupervisionError
from villagemesh.node import NodeConfig, free_port

pytestmark = pytest.mark.slow


def node_on(tmp_path: Path, **settings):
    return create_network("direct", name="n", data_dir=tmp_path / "n", lan=False, **settings)


@pytest.fixture
def listening():
    """A port somebody else listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", free_port()))
    sock.listen()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_a_port_in_use_fails_start_at_once_with_the_os_error(tmp_path, listening):
    """The acceptor's first crash is the cause: no 30 s wait, no AskTimeout, the OS error named."""
    node = node_on(tmp_path, port=listening)
    began = time.monotonic()
    with pytest.raises(NodeStartFailed) as info:
        node.start()
    assert time.monotonic() - began < node.config.start_timeout / 2  # it did not wait for a timeout
    assert info.value.child == "acceptor" and "in use" in info.value.detail.lower()
    with pytest.raises(SupervisionError, match="not running"):
        node.peers()  # everything it started is stopped again, and the data dir is free for the next node
    create_network("direct", data_dir=tmp_path / "n", lan=False).start().stop()


def test_the_cli_node_exits_non_zero_with_the_cause_when_its_port_is_in_use(tmp_path, listening):
    command = ["node", "--data-dir", str(tmp_path / "n"), "--quiet", "--port", str(listening)]
    done = subprocess.run(
        [sys.executable, "-m", "villagemesh.cli", *command],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "NodeStartFailed" in done.stderr and "acceptor" in done.stderr and "in use" in done.stderr.lower()
    assert "LISTEN" not in done.stdout


def test_a_store_that_cannot_be_read_fails_start_before_anything_runs(tmp_path):
    """A peers file that is not SQLite: refused with the file named (the issue's corrupt peers.sqlite3)."""
    data = tmp_path / "n"
    node_on(tmp_path).start().stop()
    (data / "peers.sqlite3").write_bytes(b"not a database at all" * 400)
    with pytest.raises(StorageError, match=r"peers\.sqlite3"):
        node_on(tmp_path).start()


def test_after_a_root_escalation_every_call_raises_node_failed_at_once(tmp_path):
    node = node_on(tmp_path).start()
    failed = threading.Event()
    node.on_failure(lambda error: failed.set())
    try:
        for _ in range(40):  # the root allows 20 restarts within 10 s
            if failed.is_set():
                break
            try:
                node.crash("keeper")
                node.network_status()
            except NodeFailed:
                break
        assert failed.wait(WAIT)
        began = time.monotonic()
        calls = (
            node.peers,
            node.network_status,
            lambda: node.send("f" * 32, b"x"),
            lambda: node.subscribe("DATA", print),
            node.discover_now,
            node.start,  # failed, not stopped: start() does not pretend all is well
        )
        for call in calls:
            with pytest.raises(NodeFailed) as info:
                call()
            assert info.value.child == "keeper" and info.value.exc_type == "CrashInjected"
        assert time.monotonic() - began < 1.0  # at once, not after an ask timeout each
        assert node.failure is not None and str(node.failure) == str(info.value)
        late = []
        node.on_failure(late.append)
        assert late == [node.failure]
    finally:
        node.stop()


def test_a_failed_cli_node_exits_non_zero_with_the_cause(tmp_path):
    """The CLI node watches its node: when the root gives up, it stops and says why."""
    script = (
        "import sys, threading\n"
        "from villagemesh import cli\n"
        "from villagemesh.node import Node\n"
        "start = Node.start\n"
        "def crashing(self):\n"
        "    start(self)\n"
        "    def loop():\n"
        "        while self.failure is None:\n"
        "            try:\n"
        "                self.crash('keeper')\n"
        "            except Exception:\n"
        "                return\n"
        "            threading.Event().wait(0.01)\n"
        "    threading.Thread(target=loop, daemon=True).start()\n"
        "    return self\n"
        "Node.start = crashing\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "node", "--data-dir", str(tmp_path / "n"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout.startswith("LISTEN ")
    assert "NodeFailed" in done.stderr and "keeper" in done.stderr and "CrashInjected" in done.stderr


# -- arguments ---------------------------------------------------------------------------------------


def test_send_checks_every_argument_naming_the_value(tmp_path):
    node = node_on(tmp_path).start()
    try:
        for kwargs, named in (
            ({"payload": 5}, "got int"),  # not five zero bytes
            ({"payload": [1, 2, 3]}, "got list"),  # not b"\x01\x02\x03"
            ({"payload": "text"}, "got str"),
            ({"payload": None}, "got NoneType"),
            ({"ttl": "abc"}, "'abc'"),
            ({"ttl": 0}, "ttl"),
            ({"ttl": float("nan")}, "nan"),
            ({"kind": ""}, "kind"),
            ({"peer_id": None}, "None"),
            ({"correlation_id": "x"}, "'x'"),
            ({"priority": "urgent"}, "'urgent'"),
        ):
            args = {"peer_id": "f" * 32, "payload": b"x", **kwargs}
            with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
                node.send(args.pop("peer_id"), args.pop("payload"), **args)
        assert node.send("f" * 32, bytearray(b"ab")) and node.send("f" * 32, memoryview(b"xaby")[1:3])
        assert node.network_status()["retrier"]["pending"] == 2  # only the bytes-like ones were queued
        with pytest.raises(ConfigError, match="handler"):
            node.subscribe("DATA", "not callable")
        with pytest.raises(ConfigError, match="count"):
            node.wait_for_peers(-1, 1.0)
    finally:
        node.stop()


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"ack_timeout": "10"}, "'10'"),
        ({"backoff_max": -1}, "backoff_max"),
        ({"port": "80"}, "'80'"),
        ({"lan": "yes"}, "'yes'"),
        ({"host": ""}, "host"),
        ({"bootstrap": "127.0.0.1:9"}, "127.0.0.1:9"),
        ({"bootstrap": (9,)}, "9"),
        ({"start_timeout": float("inf")}, "inf"),
        ({"checkpoint_interval": 0}, "checkpoint_interval"),
        ({"accept_loss": 1}, "accept_loss"),
        ({"capabilities": {"cpu": 1}}, "dict"),
        ({"data_dir": 5}, "5"),
    ],
)
def test_every_setting_is_checked_naming_the_value(tmp_path, settings, named):
    with pytest.raises(ConfigError, match=named):
        NodeConfig(**{"data_dir": tmp_path, **settings})


def test_a_data_dir_that_is_a_file_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        create_network("direct", data_dir=path)
