"""The status endpoint on the node's one port, and the stand-alone dashboard reading a copied log."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import WAIT
from villagemesh.dashboard.sources import Sources, parse_target
from villagemesh.dashboard.view import MeshView
from villagemesh.errors import ConfigError
from villagemesh.node import Node, create_network

pytestmark = pytest.mark.slow


def get(url: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@contextlib.contextmanager
def two_nodes(tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    """Nodes a and b, running, each knowing the other."""
    with (
        create_network("hybrid", data_dir=tmp_path / "a", name="a") as a,
        create_network(
            "hybrid", data_dir=tmp_path / "b", name="b", bootstrap=(f"127.0.0.1:{a.port}",), discovery_interval=0.3
        ) as b,
    ):
        assert b.wait_for_peers(1, WAIT) and a.wait_for_peers(1, WAIT)
        yield a, b


def test_the_status_endpoint_answers_json_on_the_nodes_port_and_changes_nothing(tmp_path: Path) -> None:
    with two_nodes(tmp_path) as (a, b):
        code, body = get(f"http://{a.acceptor_address}/villagemesh/status")
        assert code == 200
        status = json.loads(body)
        assert (status["node"], status["node_id"], status["errors"]) == ("a", a.node_id, {})
        assert {row["id"] for row in status["tree"]} >= {"registry", "retrier", "transports", "acceptor"}
        assert status["actors"]["registry"]["in"] > 0 and "ask_p99_ms" in status["actors"]["registry"]
        assert status["transports"]["websocket"] == {"transmit_ok": 0, "transmit_failed": 0}
        (peer,) = status["peers"]
        assert peer["peer_id"] == b.node_id and peer["addresses"]["websocket"] == [b.address]
        assert 0 <= peer["evolution_priority"] <= 1 and peer["capabilities"]["cpu_cores"] >= 1
        assert set(status["outbox"]["pending_by_priority"]) == {"critical", "high", "normal", "low", "bulk"}
        assert get(f"http://{a.acceptor_address}/villagemesh/status", method="POST")[0] == 405
        assert get(f"http://{a.acceptor_address}/villagemesh/dashboard")[0] == 404  # not asked for


def test_the_status_endpoint_shows_a_transfers_progress_on_both_sides(tmp_path: Path) -> None:
    source = tmp_path / "weights.bin"
    source.write_bytes(bytes(range(256)) * 4096 * 32)  # 32 MiB
    size = source.stat().st_size
    with two_nodes(tmp_path) as (a, b):
        handle = b.send_file(a.node_id, source, kind="model")
        seen: list[int] = []
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            status = json.loads(get(f"http://{b.acceptor_address}/villagemesh/status")[1])
            (row,) = status["transfers"]
            seen.append(row["done"])
            if row["state"] == "done":
                break
        assert seen == sorted(seen) and seen[-1] == size, f"progress went {seen}"
        assert any(0 < done < size for done in seen), f"no progress between the ends was shown: {seen}"
        assert handle.wait(WAIT).state == "done"
        (out,) = json.loads(get(f"http://{b.acceptor_address}/villagemesh/status")[1])["transfers"]
        (into,) = json.loads(get(f"http://{a.acceptor_address}/villagemesh/status")[1])["transfers"]
    assert (out["direction"], out["peer_id"], out["name"], out["kind"]) == ("out", a.node_id, "weights.bin", "model")
    assert (into["direction"], into["peer_id"], into["transfer_id"]) == ("in", b.node_id, out["transfer_id"])
    assert (out["size"], out["done"], into["size"], into["done"]) == (size, size, size, size)
    assert out["state"] == into["state"] == "done"
    assert str(source) not in json.dumps([out, into])  # no file paths


def test_the_status_endpoint_can_be_turned_off(tmp_path: Path) -> None:
    with create_network("hybrid", data_dir=tmp_path / "a", status_endpoint=False) as node:
        assert get(f"http://{node.acceptor_address}/villagemesh/status")[0] == 404
        assert get(f"http://{node.acceptor_address}/health")[0] == 200
    with pytest.raises(ConfigError, match="dashboard"):
        create_network("hybrid", data_dir=tmp_path / "b", dashboard="yes")


def test_the_stand_alone_dashboard_reads_a_copied_log_and_a_nodes_live_figures(tmp_path: Path) -> None:
    with create_network("hybrid", data_dir=tmp_path / "a", name="alice") as node:
        node.crash("websocket")
        deadline = time.monotonic() + WAIT
        while "child_restarted" not in node.log_path.read_text():
            assert time.monotonic() < deadline, "no restart logged"
            time.sleep(0.05)
        copy = tmp_path / "copied.jsonl"
        shutil.copy(node.log_path, copy)
        argv = [sys.executable, "-m", "villagemesh.cli", "dashboard", "--port", "0", "--log", str(copy)]
        proc = subprocess.Popen([*argv, "--node", node.acceptor_address], stdout=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            assert line.startswith("DASHBOARD http://127.0.0.1:"), line
            url = line.split()[1]
            assert get("/".join(url.split("/")[:3]) + "/")[0] == 200  # / goes to the page
            deadline = time.monotonic() + WAIT
            while True:
                state = json.loads(get(url + "/state")[1])
                nodes = state["nodes"]
                if nodes and nodes[0]["actors"] and state["timeline"]:
                    break
                assert time.monotonic() < deadline, f"the dashboard never showed the node: {state}"
                time.sleep(0.1)
            (alice,) = nodes
            (root,) = alice["tree"]
            transports = next(c for c in root["children"] if c["id"] == "transports")["supervisor"]
            websocket = next(c for c in transports["children"] if c["id"] == "websocket")
            assert websocket["restart_count"] == 1 and websocket["last_crash"]["exc_type"] == "CrashInjected"
            assert alice["node_id"] == node.node_id and state["errors"] == {}
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT) == 0


def test_an_unreachable_node_is_named_in_the_errors(tmp_path: Path) -> None:
    from villagemesh.node import free_port

    sources = Sources(nodes=[f"127.0.0.1:{free_port()}"])
    sources.fetch_status(MeshView())
    ((target, error),) = sources.errors.items()
    assert target.startswith("127.0.0.1:") and "ConnectError" in error


def test_a_node_target_is_host_and_port() -> None:
    assert parse_target("[::1]:7000") == ("::1", 7000)
    for bad in ("host", ":80", "h:0", "h:x"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            parse_target(bad)


def test_skipped_log_lines_are_named_in_the_errors(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text('{"event": "node_started", "node": "n"}\nnot json\n')
    sources = Sources([log])
    view = MeshView()
    assert [e["event"] for e in sources.poll_logs(view)] == ["node_started"]
    assert sources.errors == {str(log): "1 line(s) skipped (not JSON, or too long)"}
    sources.close()
