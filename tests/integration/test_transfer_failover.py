"""Failover mid-transfer: chunks ride libp2p (first in the direct and hybrid orders); when it fails, the
transfer goes on over WebSocket (next in the order), verified, with no chunk lost or written twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration._nodes import PATIENCE, EventFile, make_node, running
from tests.integration.test_transfer import Inbox, blob

pytestmark = pytest.mark.slow

SIZE = 24 * 1024 * 1024


def delivered_on(events: EventFile) -> list[set[str]]:
    """The transports of each round of deliveries, in log order."""
    return [set(e["transports"]) for e in events.matching("messages_delivered")]


@pytest.mark.parametrize("mode", ["direct", "hybrid"])
def test_a_transfer_over_libp2p_continues_over_websocket_when_libp2p_crashes(tmp_path: Path, mode):
    """The sender's libp2p actor crashes mid-transfer: its attempts in flight fail at once (TransportDown)
    and go again over WebSocket; the receiver writes each chunk once."""
    a = make_node(tmp_path / "a", "a", mode=mode)
    b = make_node(tmp_path / "b", "b", mode=mode, bootstrap=[a.acceptor_address])
    inbox = Inbox()
    a.on_transfer(inbox)
    source = blob(tmp_path / "weights.bin", SIZE)
    sent = EventFile(tmp_path / "b" / "events.jsonl")
    with running([a, b]):
        assert b.wait_for_peers(1, PATIENCE)
        assert {t for t, _ in b.peers()[0].addresses} >= {"libp2p", "websocket"}
        handle = b.send_file(a.node_id, source)
        while handle.progress.done < 4 * 1024 * 1024:
            with pytest.raises(TimeoutError):
                handle.wait(0.02)
        before = len(delivered_on(sent))
        assert {"libp2p"} == set().union(*delivered_on(sent)), "chunks went over libp2p before the crash"
        b.crash("libp2p")
        final = handle.wait(PATIENCE)
        assert (final.state, final.done) == ("done", SIZE)
        (got,) = inbox.wait(1)
        assert got.path.read_bytes() == source.read_bytes()
        after = set().union(*delivered_on(sent)[before:])
        assert "websocket" in after, f"after the crash, deliveries went over {after} only"
        (completed,) = EventFile(tmp_path / "a" / "events.jsonl").matching("transfer_completed", direction="in")
        assert completed["chunks_written"] == completed["chunks"] == SIZE // (256 * 1024)  # none twice


def test_a_transfer_continues_when_the_receivers_libp2p_crashes_mid_way(tmp_path: Path):
    """The receiver's libp2p actor crashes mid-transfer (its connections and what it had not yet handed
    to the retrier are gone): the sender's attempts on libp2p fail or time out and go again, over
    WebSocket or libp2p once restarted; the file arrives whole and verified."""
    a = make_node(tmp_path / "a", "a")
    b = make_node(tmp_path / "b", "b", bootstrap=[a.acceptor_address])
    inbox = Inbox()
    a.on_transfer(inbox)
    source = blob(tmp_path / "weights.bin", SIZE)
    with running([a, b]):
        assert b.wait_for_peers(1, PATIENCE)
        handle = b.send_file(a.node_id, source)
        while handle.progress.done < 4 * 1024 * 1024:
            with pytest.raises(TimeoutError):
                handle.wait(0.02)
        a.crash("libp2p")
        final = handle.wait(PATIENCE)
        assert (final.state, final.done) == ("done", SIZE)
        (got,) = inbox.wait(1)
        assert got.path.read_bytes() == source.read_bytes()
        (completed,) = EventFile(tmp_path / "a" / "events.jsonl").matching("transfer_completed", direction="in")
        assert completed["chunks"] == SIZE // (256 * 1024)


def test_a_transfer_waits_out_a_peer_that_no_transport_reaches_and_resumes_when_it_is_back(tmp_path: Path):
    """The receiver goes away mid-transfer (every transport to it fails) for longer than the sender's
    retrier tries a chunk: the transfer does not fail; the sender offers again every stall interval,
    and once the receiver is back (same data dir and port) it resumes from the committed chunks and
    completes, verified (docs/embedding.md: a transfer waits for its peer until it is cancelled)."""
    settings = {"max_attempts": 3, "backoff_max": 0.1, "transfer_stall_s": 0.5}
    a = make_node(tmp_path / "a", "a", **settings)
    b = make_node(tmp_path / "b", "b", bootstrap=[a.acceptor_address], **settings)
    inbox = Inbox()
    source = blob(tmp_path / "weights.bin", SIZE)
    sent = EventFile(tmp_path / "b" / "events.jsonl")
    with running([b]):
        a.start()
        try:
            assert b.wait_for_peers(1, PATIENCE)
            handle = b.send_file(a.node_id, source)
            while handle.progress.done < 4 * 1024 * 1024:
                with pytest.raises(TimeoutError):
                    handle.wait(0.02)
        finally:
            a.stop()
        failed_before = len(sent.matching("delivery_failed"))
        sent.wait_for("delivery_failed", count=failed_before + 1)  # attempts on every transport spent
        reoffers = len(sent.matching("transfer_reoffered"))
        sent.wait_for("transfer_reoffered", count=reoffers + 2)  # still offering, not failed
        assert not handle.done() and handle.progress.state == "running"
        again = make_node(tmp_path / "a", "a", port=a.port, **settings)
        again.on_transfer(inbox)
        with running([again]):
            final = handle.wait(PATIENCE)
            assert (final.state, final.done) == ("done", SIZE)
            (got,) = inbox.wait(1)
            assert got.path.read_bytes() == source.read_bytes()
            (resumed, *_) = EventFile(tmp_path / "a" / "events.jsonl").matching("transfer_resumed")
            assert resumed["resume_from"] > 0, "resumed from zero"
