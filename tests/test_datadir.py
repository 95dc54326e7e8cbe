"""A damaged data dir is never started on silently: each case through the public API and the CLI.

One node, in a child process, queues 300 messages to a peer that does not exist and is
killed with SIGKILL; each test damages a copy of its data dir the way a disk, an
operator or a backup tool might, and a node started on it must refuse with a
``StorageError`` naming the file and what is wrong (``villagemesh doctor`` says the
same), unless told to accept the loss.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from villagemesh import create_network
from villagemesh.errors import IdentityError, StorageError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = "messages.sqlite3"
QUEUED = 300


def node_on(data_dir: Path, **settings):
    return create_network("direct", name="n", data_dir=data_dir, lan=False, **settings)


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """A data dir whose node queued 300 messages and was killed with SIGKILL (nothing checkpointed since)."""
    from villagemesh.node import free_port

    data = tmp_path_factory.mktemp("killed") / "node"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "integration" / "node_runner.py"),
            *("--data-dir", str(data), "--name", "k", "--port", str(free_port())),
            *("--send-to", "f" * 32, "--count", str(QUEUED)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("SENT"):
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert (data / f"{MESSAGES}-wal").stat().st_size > 0  # the messages are in the log
    return data


@pytest.fixture
def copy(killed, tmp_path) -> Path:
    target = tmp_path / "node"
    shutil.copytree(killed, target, ignore=shutil.ignore_patterns("node.lock"))
    return target


def refused(data: Path, *words: str) -> str:
    with pytest.raises(StorageError) as info:
        node_on(data).start()
    message = str(info.value)
    for word in (MESSAGES, *words):
        assert word in message
    return message


def doctor(data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "villagemesh.cli", "doctor", str(data)], capture_output=True, text=True, timeout=60
    )


def test_an_undamaged_killed_node_restarts_with_every_queued_message(copy):
    """The control case: kill -9 alone loses nothing, and the doctor finds nothing to say."""
    assert doctor(copy).returncode == 0
    node = node_on(copy).start()
    try:
        assert node.network_status()["retrier"]["pending"] == QUEUED
    finally:
        node.stop()


def test_a_store_truncated_to_zero_bytes_is_refused_not_taken_for_a_new_one(copy):
    os.truncate(copy / MESSAGES, 0)
    message = refused(copy, "empty", "would lose")
    assert "0 bytes" in message


def test_a_deleted_write_ahead_log_shows_as_a_store_rolled_back(copy):
    os.unlink(copy / f"{MESSAGES}-wal")
    refused(copy, "rolled back", "generation")


def test_a_deleted_database_with_its_log_left_is_missing(copy):
    os.unlink(copy / MESSAGES)
    refused(copy, "missing", "-wal")


def test_a_half_truncated_log_is_refused(copy):
    wal = copy / f"{MESSAGES}-wal"
    os.truncate(wal, wal.stat().st_size // 2)
    refused(copy, "damaged log", "partial frame")


def test_a_log_with_garbage_appended_is_refused(copy):
    with open(copy / f"{MESSAGES}-wal", "ab") as wal:
        wal.write(os.urandom(4096))
    refused(copy, "damaged log")


def test_a_store_replaced_by_another_nodes_is_refused(copy, tmp_path):
    other = tmp_path / "other"
    node_on(other).start().stop()
    for suffix in ("", "-wal", "-shm"):
        (copy / f"{MESSAGES}{suffix}").unlink(missing_ok=True)
    shutil.copy(other / MESSAGES, copy / MESSAGES)
    refused(copy, "replaced", "store identity")


def test_a_store_with_a_garbage_page_is_refused_by_quick_check(tmp_path):
    """A clean stop leaves no log; a page overwritten in the middle of the file is found on open."""
    data = tmp_path / "node"
    node = node_on(data).start()
    for i in range(200):
        node.send("f" * 32, os.urandom(600) + bytes([i]))
    node.stop()
    size = (data / MESSAGES).stat().st_size
    assert size >= 8 * 4096
    with open(data / MESSAGES, "r+b") as db:
        db.seek(4 * 4096)
        db.write(os.urandom(4096))
    refused(data, "corrupt")


def test_the_doctor_reports_what_start_would_refuse_without_starting(copy):
    os.unlink(copy / f"{MESSAGES}-wal")
    stores = ("manifest.json", "node.key", MESSAGES, "peers.sqlite3", "peers.sqlite3-wal")
    before = {name: (copy / name).read_bytes() for name in stores}
    done = doctor(copy)
    assert done.returncode == 1
    assert MESSAGES in done.stderr and "rolled back" in done.stderr
    assert {name: (copy / name).read_bytes() for name in stores} == before  # nothing changed, moved or started
    assert (copy / "events.jsonl").read_text().count("node_starting") == 1


def test_accept_loss_starts_anyway_and_logs_what_was_dropped(copy):
    os.truncate(copy / MESSAGES, 0)
    node = node_on(copy, accept_loss=True).start()
    try:
        assert node.network_status()["retrier"]["pending"] == 0
    finally:
        node.stop()
    events = [json.loads(line) for line in (copy / "events.jsonl").read_text().splitlines()]
    dropped = [e for e in events if e["event"] == "store_loss_accepted"]
    assert [(e["file"], e["problem"]) for e in dropped] == [(MESSAGES, "empty")]
    assert dropped[0]["moved"] and (copy / dropped[0]["moved"][0]).exists()
    node_on(copy).start().stop()  # and the data dir is consistent again


def test_the_cli_node_refuses_a_damaged_data_dir_and_accept_loss_goes_on(copy):
    os.unlink(copy / f"{MESSAGES}-wal")
    done = subprocess.run(
        [sys.executable, "-m", "villagemesh.cli", "node", "--data-dir", str(copy), "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "StorageError" in done.stderr and "rolled back" in done.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "villagemesh.cli", "node", "--data-dir", str(copy), "--quiet", "--accept-loss"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("LISTEN ")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_a_checkpoint_moves_the_log_into_the_database_and_advances_the_manifest(tmp_path):
    """After the keeper's checkpoint a deleted log loses nothing that was queued before it."""
    data = tmp_path / "node"
    node = node_on(data, checkpoint_interval=0.1).start()
    try:
        for i in range(20):
            node.send("f" * 32, bytes([i]))
        before = json.loads((data / "manifest.json").read_text())["stores"][MESSAGES]["generation"]
        from villagemesh.actors.keeper.messages import CheckpointNow

        reply = node._client().ask("keeper", CheckpointNow(), timeout=10)
        assert reply.generations[MESSAGES] > before
        manifest = json.loads((data / "manifest.json").read_text())["stores"][MESSAGES]
        assert manifest["counts"]["queued outbox message(s)"] == 20
        with sqlite3.connect(f"file:{data / MESSAGES}?mode=ro&immutable=1", uri=True) as db:
            assert db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 20  # in the database file itself
    finally:
        node.stop()


# -- identity ---------------------------------------------------------------------------------------


def test_a_deleted_key_with_history_is_an_identity_error_unless_told(copy):
    old = json.loads((copy / "manifest.json").read_text())["node_id"]
    os.unlink(copy / "node.key")
    with pytest.raises(IdentityError, match="missing"):
        node_on(copy)
    assert "missing" in doctor(copy).stderr
    node = node_on(copy, new_identity=True)
    assert node.node_id != old
    node.start().stop()
    events = [json.loads(line) for line in (copy / "events.jsonl").read_text().splitlines()]
    created = [e for e in events if e["event"] == "identity_created"]
    assert created and created[-1]["node_id"] == node.node_id and "missing" in created[-1]["reason"]


def test_a_garbage_key_with_history_is_an_identity_error(copy):
    (copy / "node.key").write_bytes(b"garbage")
    with pytest.raises(IdentityError, match="history"):
        node_on(copy)


def test_another_nodes_key_is_an_identity_error(copy, tmp_path):
    other = tmp_path / "other"
    node_on(other)
    shutil.copy(other / "node.key", copy / "node.key")
    with pytest.raises(IdentityError, match="belongs to node"):
        node_on(copy)
