"""Large transfers between two real nodes over WebSocket: files, streams, progress, handlers, limits."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.integration._nodes import PATIENCE, make_node, running
from villagemesh.cli import ProgressBar
from villagemesh.errors import DigestMismatch, TransferRefused
from villagemesh.node import TransferLimits

pytestmark = pytest.mark.slow


def blob(path: Path, size: int, seed: int = 1) -> Path:
    """A file of ``size`` pseudo-random bytes (written in blocks)."""
    rng = hashlib.blake2b(seed.to_bytes(8, "big"))
    with path.open("wb") as out:
        left = size
        while left:
            rng.update(b"x")
            block = rng.digest() * 2048  # 128 KiB
            out.write(block[:left])
            left -= min(left, len(block))
    return path


class Inbox:
    """A receiving handler that keeps each file it got; tests wait for a count."""

    def __init__(self) -> None:
        self.files: list = []
        self.cond = threading.Condition()

    def __call__(self, received) -> None:
        with self.cond:
            self.files.append(received)
            self.cond.notify_all()

    def wait(self, count: int, timeout: float = PATIENCE) -> list:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.files) >= count, timeout), f"{len(self.files)} of {count}"
            return list(self.files)


def pair(tmp_path: Path, **receiver_settings):
    a = make_node(tmp_path / "a", "a", **receiver_settings)
    b = make_node(tmp_path / "b", "b", bootstrap=[a.acceptor_address])
    return a, b


def test_a_file_arrives_verified_in_place_with_progress_and_a_handle_that_ends_done(tmp_path):
    a, b = pair(tmp_path)
    inbox = Inbox()
    a.on_transfer(inbox)
    source = blob(tmp_path / "weights.bin", 3 * 1024 * 1024 + 17)
    with running([a, b]):
        assert b.wait_for_peers(1, PATIENCE)
        handle = b.send_file(a.node_id, source, kind="model")
        final = handle.wait(PATIENCE)
        assert (final.done, final.total, final.state) == (source.stat().st_size, source.stat().st_size, "done")
        (got,) = inbox.wait(1)
        assert (got.kind, got.name, got.peer_id, got.size) == ("model", "weights.bin", b.node_id, final.total)
        assert got.path.read_bytes() == source.read_bytes()
        assert got.path.parent == tmp_path / "a" / "received"
        assert not list((tmp_path / "a" / "transfers").iterdir())  # no partial left
        rows = {r["direction"]: r for r in a.transfers() + b.transfers()}
        assert rows["in"]["state"] == "done" and rows["out"]["state"] == "done"


@pytest.mark.parametrize(("setting", "tool"), [("sha256", hashlib.sha256), ("blake2b-256", None)])
def test_the_digest_is_the_one_the_sender_names_and_the_tools_print(tmp_path, setting, tool):
    a = make_node(tmp_path / "a", "a")
    b = make_node(tmp_path / "b", "b", bootstrap=[a.acceptor_address], transfer_digest=setting)
    assert b.transfer_digest.label == setting
    inbox = Inbox()
    a.on_transfer(inbox)
    source = blob(tmp_path / "w.bin", 700_001)
    data = source.read_bytes()
    expected = tool(data).digest() if tool else hashlib.blake2b(data, digest_size=32).digest()
    with running([a, b]):
        assert b.wait_for_peers(1, PATIENCE)
        b.send_stream(a.node_id, iter([data[:300_000], data[300_000:]]), name="s.bin").wait(PATIENCE)
        b.send_file(a.node_id, source).wait(PATIENCE)
        for got in inbox.wait(2):
            assert (got.algorithm, got.digest) == (setting, expected)
            assert got.path.read_bytes() == data


def test_the_heap_is_trimmed_when_the_last_transfer_ends_not_while_chunks_move(tmp_path, monkeypatch):
    from villagemesh.actors.transfer import actor

    trims: list[int] = []
    monkeypatch.setattr(actor, "_trim", lambda: trims.append(1))
    a, b = pair(tmp_path)
    inbox = Inbox()
    a.on_transfer(inbox)
    source = blob(tmp_path / "w.bin", 20 * 1024 * 1024)  # trimming every 8 MiB made that 4 trims, 2 a side
    with running([a, b]):
        assert b.wait_for_peers(1, PATIENCE)
        b.send_file(a.node_id, source).wait(PATIENCE)
        inbox.wait(1)
    assert len(trims) == 2  # once a side: the receiver as it verified, the sender at Complete


def test_a_stream_is_spooled_sent_and_its_spool_deleted(tmp_path):
    a, b = pair(tmp_path)
    inbox = Inbox()
    a.on_transfer(inbox, kind="shard")
    blocks = [os.urandom(100_000) for _ in range(7)]
    with running([a, b]):
        assert b.wait_for_peers(1, PATIENCE)
        handle = b.send_stream(a.node_id, iter(blocks), size=700_000, kind="shard", name="shard-3")
        handle.wait(PATIENCE)
        (got,) = inbox.wait(1)
        assert got.path.read_bytes() == b"".join(blocks)
        assert not [p for p in (tmp_path / "b" / "transfers").iterdir() if p.suffix == ".spool"]


def test_an_empty_file_is_a_transfer_too(tmp_path):
    a, b = pair(tmp_path)
    inbox = Inbox()
    a.on_transfer(inbox)
    (tmp_path / "empty").write_bytes(b"")
    with running([a, b]):
        assert b.wait_for_peers(1, PATIENCE)
        b.send_file(a.node_id, tmp_path / "empty").wait(PATIENCE)
        assert inbox.wait(1)[0].path.read_bytes() == b""


def test_the_asyncio_face_sends_a_stream_and_receives_an_async_byte_stream(tmp_path):
    a, b = pair(tmp_path)
    data = os.urandom(600_000)

    async def main() -> bytes:
        got: asyncio.Queue = asyncio.Queue()

        async def on_file(received) -> None:
            chunks = [chunk async for chunk in received.stream(block=65536)]
            await got.put(b"".join(chunks))

        a.aio.on_transfer(on_file)

        async def source():
            for i in range(0, len(data), 50_000):
                yield data[i : i + 50_000]

        async with a.aio, b.aio:
            assert await b.aio.wait_for_peers(1, PATIENCE)
            handle = await b.aio.send_stream(a.node_id, source(), name="async")
            progress = await handle
            assert progress.done == len(data)
            return await asyncio.wait_for(got.get(), PATIENCE)

    assert asyncio.run(main()) == data


def test_an_offer_over_a_limit_is_refused_before_any_byte_is_written(tmp_path):
    a, b = pair(tmp_path, transfer_limits=TransferLimits(max_bytes=1000, kinds=frozenset({"model"})))
    inbox = Inbox()
    a.on_transfer(inbox)
    big = blob(tmp_path / "big", 5000)
    small = blob(tmp_path / "small", 500)
    with running([a, b]):
        assert b.wait_for_peers(1, PATIENCE)
        with pytest.raises(TransferRefused, match=r"too_large.*5000 bytes exceeds"):
            b.send_file(a.node_id, big, kind="model").wait(PATIENCE)
        with pytest.raises(TransferRefused, match="kind_not_allowed"):
            b.send_file(a.node_id, small, kind="data").wait(PATIENCE)
        assert not list((tmp_path / "a" / "transfers").iterdir())
        assert a.transfers() == []
    assert inbox.files == []


def test_a_digest_mismatch_deletes_the_partial_and_is_a_typed_error_on_both_sides(tmp_path):
    a, b = pair(tmp_path)
    inbox, failures = Inbox(), Inbox()
    a.on_transfer(inbox)
    a.on_transfer_failed(failures)
    source = blob(tmp_path / "data", 600_000)
    with running([a, b]):
        assert b.wait_for_peers(1, PATIENCE)
        # An offer whose digest is not the bytes' (what a file changed after hashing would give).
        handle = b._offer(a.node_id, str(source), 600_000, bytes(32), "file", "data")
        with pytest.raises(DigestMismatch, match="digest_mismatch"):
            handle.wait(PATIENCE)
        (error,) = failures.wait(1)
        assert isinstance(error, DigestMismatch) and error.peer_id == b.node_id
        assert not list((tmp_path / "a" / "transfers").iterdir())
        assert not list((tmp_path / "a" / "received").iterdir())
        assert [r["state"] for r in a.transfers()] == ["failed"]
    assert inbox.files == []


def test_small_messages_are_not_stalled_behind_a_transfer(tmp_path):
    """Messages sent after a transfer started are all handled while it still runs (chunks are BULK)."""
    a, b = pair(tmp_path)
    handled = Inbox()
    a.subscribe("PING", handled)
    source = blob(tmp_path / "big", 32 * 1024 * 1024)
    with running([a, b]):
        assert b.wait_for_peers(1, PATIENCE)
        handle = b.send_file(a.node_id, source)
        while handle.progress.done < 4 * 1024 * 1024:  # the transfer is under way
            with pytest.raises(TimeoutError):
                handle.wait(0.05)
        pings = [b.send(a.node_id, str(i).encode(), kind="PING") for i in range(20)]
        for ping in pings:
            assert ping.result(PATIENCE).delivered
        assert not handle.done(), f"the transfer ended before 20 small messages got through: {handle.progress}"
        assert [m.payload for m in handled.wait(20)] == [str(i).encode() for i in range(20)]
        handle.wait(PATIENCE)


def test_small_messages_of_every_priority_get_through_a_transfer_without_waiting_behind_its_chunks(tmp_path):
    """Messages of each priority sent mid-transfer keep their order within their priority and are each
    handled before the receiver has written four windows of chunks past what the sender knew acked when
    the message left (that view lags the receiver by up to a window and its ack; the handler reads the
    receiver's progress as the partial file's size, without asking the busy transfer actor, whose turns
    made each handler wait and the later messages look late): they queue behind the chunks in flight,
    never behind the rest of the transfer (counted in bytes, not timed; 64 MiB: the rest is more than
    56 MiB when they leave). (Reordering across priorities needs the retrier's in-flight slots contended;
    :func:`tests.actors.retrier.test_state.test_within_a_batch_the_free_slots_go_by_priority` covers it:
    one transfer holds a window, far below ``max_in_flight``.)"""
    a, b = pair(tmp_path)
    source = blob(tmp_path / "big", 64 * 1024 * 1024)
    seen: list[tuple[str, int]] = []
    cond = threading.Condition()

    partials = a.config.data_dir / "transfers"

    def written() -> int:
        """The bytes the receiver has written so far (all of them once the file was moved into place)."""
        try:
            return max((p.stat().st_size for p in partials.glob("*.part")), default=64 * 1024 * 1024)
        except FileNotFoundError:  # moved into place between the listing and the stat
            return 64 * 1024 * 1024

    def on_ping(message) -> None:
        with cond:
            seen.append((message.payload.decode(), written()))
            cond.notify_all()

    a.subscribe("PING", on_ping)
    priorities = ["CRITICAL", "HIGH", "NORMAL", "LOW"]
    with running([a, b]):
        assert b.wait_for_peers(1, PATIENCE)
        handle = b.send_file(a.node_id, source)
        while handle.progress.done < 4 * 1024 * 1024:
            with pytest.raises(TimeoutError):
                handle.wait(0.05)
        sent_at: dict[str, int] = {}
        pings = []
        for round_ in range(3):
            for priority in priorities:
                name = f"{priority}-{round_}"
                sent_at[name] = handle.progress.done
                pings.append(b.send(a.node_id, name.encode(), kind="PING", priority=priority))
        for ping in pings:
            assert ping.result(PATIENCE).delivered
        assert not handle.done(), f"the transfer ended before the small messages got through: {handle.progress}"
        with cond:
            assert cond.wait_for(lambda: len(seen) == len(pings), PATIENCE)
        handle.wait(PATIENCE)
    for priority in priorities:
        assert [n for n, _ in seen if n.startswith(priority)] == [f"{priority}-{r}" for r in range(3)]
    window_bytes = 16 * 256 * 1024  # NodeConfig.transfer_window x the chunk size
    behind = {name: done - sent_at[name] for name, done in seen}
    assert max(behind.values()) <= 4 * window_bytes, behind


@pytest.mark.parametrize("actor", ["websocket", "transfer", "retrier"])
def test_a_transfer_survives_a_crash_of_the_senders_actors_mid_way(tmp_path, actor):
    """The transport crashing fails its attempts over (the retrier tries the next transport of the
    mode's order; here WebSocket again once restarted); the transfer actor or the retrier crashing
    resumes from what the receiver committed."""
    a, b = pair(tmp_path)
    inbox = Inbox()
    a.on_transfer(inbox)
    source = blob(tmp_path / "big", 16 * 1024 * 1024)
    with running([a, b]):
        assert b.wait_for_peers(1, PATIENCE)
        handle = b.send_file(a.node_id, source)
        while handle.progress.done < 2 * 1024 * 1024:
            with pytest.raises(TimeoutError):
                handle.wait(0.02)
        b.crash(actor)
        handle.wait(PATIENCE)
        (got,) = inbox.wait(1)
        assert got.path.read_bytes() == source.read_bytes()


def test_the_cli_sends_a_file_with_a_progress_bar_and_the_node_prints_where_it_went(tmp_path):
    cli = [sys.executable, "-m", "villagemesh.cli"]
    source = blob(tmp_path / "model.bin", 2 * 1024 * 1024)
    node = subprocess.Popen(
        [*cli, "node", "--data-dir", str(tmp_path / "server"), "--quiet"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert node.stdout is not None
        _, node_id, address = node.stdout.readline().split()
        sent = subprocess.run(
            [
                *cli,
                "send",
                "--to",
                node_id,
                "--via",
                address,
                "--data-dir",
                str(tmp_path / "client"),
                "--file",
                str(source),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
        assert "model.bin [" + "#" * 30 + "] 100.0 %" in sent.stderr and "verified by" in sent.stderr
        line = node.stdout.readline().split()
        assert line[:3] == ["RECEIVED", "FILE", "file"]
        assert Path(line[-1]).read_bytes() == source.read_bytes()
    finally:
        node.send_signal(signal.SIGTERM)
        assert node.wait(PATIENCE) == 0


def test_the_progress_bar_draws_share_bytes_and_rate():
    bar = ProgressBar(io.StringIO(), "w.bin", 4 * 1024 * 1024)
    assert bar.line(1024 * 1024, 2 * 1024 * 1024) == (
        "w.bin [#######.......................]  25.0 %  1.0/4.0 MiB  2.0 MiB/s"
    )
    assert ProgressBar(io.StringIO(), "e", 0).line(0, 0.0).startswith("e [" + "#" * 30 + "] 100.0 %")


def moved_before_its_commit(data_dir: Path, sent: bytes, on_disk: bytes) -> tuple[Path, Any]:
    """A receiver's data dir as a kill between the move and its commit leaves it: an incoming SHA-256
    offer of ``sent`` with every chunk committed, no partial file, and ``on_disk`` moved into place."""
    from villagemesh.actors.transfer.store import TransferStore
    from villagemesh.protocols.transfer import DigestAlgorithm, Offer

    final = data_dir / "received" / "w.bin"
    final.parent.mkdir(parents=True)
    final.write_bytes(on_disk)
    offer = Offer(
        os.urandom(16), len(sent), 256 * 1024, hashlib.sha256(sent).digest(), "file", "w.bin", DigestAlgorithm.SHA_256
    )
    store = TransferStore(data_dir / "transfers.sqlite3")
    store.add_incoming(offer, "b" * 32, str(data_dir / "transfers" / "x.part"), str(final))
    store.commit_chunks([(offer.transfer_id, i) for i in range(offer.chunks)])
    store.close()
    return final, offer


def test_a_receiver_killed_between_the_move_and_its_commit_verifies_the_moved_file_at_start(tmp_path):
    """The last chunk committed, the file moved into place, the node killed before it recorded the end:
    at start it hashes the moved file (by the offer's algorithm) and hands it to the handlers."""
    data = os.urandom(600_000)
    final, offer = moved_before_its_commit(tmp_path / "a", data, data)
    a = make_node(tmp_path / "a", "a")
    inbox = Inbox()
    a.on_transfer(inbox)
    with running([a]):
        (got,) = inbox.wait(1)
    assert (got.path, got.algorithm, got.digest) == (final, "sha256", offer.digest)
    assert final.read_bytes() == data


def test_a_moved_file_whose_digest_does_not_match_at_start_is_deleted_and_reported(tmp_path):
    """Killed between the move and its commit, with bytes on disk that are not the offer's: at start
    the moved file fails its re-hash, is deleted (not left in received/) and a DigestMismatch is reported."""
    data = os.urandom(600_000)
    final, _ = moved_before_its_commit(tmp_path / "a", data, data[:-1] + bytes([data[-1] ^ 1]))  # one bit off
    a = make_node(tmp_path / "a", "a")
    received, failed = Inbox(), Inbox()
    a.on_transfer(received)
    a.on_transfer_failed(failed)
    with running([a]):
        (error,) = failed.wait(1)
        assert isinstance(error, DigestMismatch), error
        assert not final.exists(), "the unverified file was left in place"
        assert [row["state"] for row in a.transfers()] == ["failed"]
    assert received.files == []
