"""A 256 MiB transfer survives ``kill -9`` of its receiver and its sender, three times, at random points.

Both nodes run in child processes (:mod:`.node_runner`). After each kill the
restarted node goes on from the chunks both sides committed, never from zero:
a restarted receiver restores every chunk it had reported committed, and a
restarted sender offers again and is answered with a resume point at or past
what the receiver had committed before the kill.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from tests.integration._nodes import PATIENCE, EventFile, free_port, wait_until
from tests.integration.test_network import Child
from villagemesh.actors.transfer.state import DEFAULT_WINDOW

pytestmark = pytest.mark.slow

SIZE = 256 * 1024 * 1024
CHUNK = 256 * 1024


def received_bytes(child: Child) -> int:
    """What the receiver process last reported committed of its incoming transfer."""
    done = [int(line.split()[3]) for line in list(child.lines) if line.startswith("XFER in ")]
    return max(done, default=0)


def test_a_256_mib_transfer_resumes_after_three_kill_9s_of_either_node(tmp_path: Path) -> None:
    children: list[Child] = []
    try:
        _kill_three_times(tmp_path, children)
    finally:
        for child in children:
            child.terminate()


def _kill_three_times(tmp_path: Path, children: list[Child]) -> None:
    rng = random.Random(os.environ.get("TRANSFER_KILL_SEED") or None)
    source = tmp_path / "weights.bin"
    digest = hashlib.blake2b(digest_size=32)
    with source.open("wb") as out:
        for _ in range(SIZE // (1 << 20)):
            block = os.urandom(1 << 20)
            digest.update(block)
            out.write(block)
    port_r, port_s = free_port(), free_port()
    r_args = ["--data-dir", str(tmp_path / "r"), "--name", "r", "--port", str(port_r), "--transfers"]
    r_args += ["--bootstrap", f"127.0.0.1:{port_s}", "--stall", "2"]
    s_args = ["--data-dir", str(tmp_path / "s"), "--name", "s", "--port", str(port_s), "--transfers"]
    s_args += ["--bootstrap", f"127.0.0.1:{port_r}", "--stall", "2"]

    receiver = Child(*r_args)
    children.append(receiver)
    receiver_id = receiver.wait_line("LISTEN").split()[1]
    sender = Child(*s_args, "--send-to", receiver_id, "--send-file", str(source))
    children.append(sender)
    sender.wait_line("OFFERED")
    r_log, s_log = EventFile(tmp_path / "r" / "events.jsonl"), EventFile(tmp_path / "s" / "events.jsonl")

    points = sorted(rng.uniform(0.1, 0.85) for _ in range(3))
    victims = ["receiver", "sender", rng.choice(["receiver", "sender"])]
    for point, victim in zip(points, victims, strict=True):

        def reached(receiver: Child = receiver, point: float = point) -> bool:
            return received_bytes(receiver) >= point * SIZE

        assert wait_until(reached, timeout=PATIENCE, every=0.02), (
            f"the receiver reported {received_bytes(receiver)} bytes, waiting for {point:.2f} of {SIZE}"
        )
        committed = received_bytes(receiver)
        assert committed < SIZE, "the transfer ended before the kill"
        if victim == "receiver":
            restored_before = len(r_log.matching("transfer_restored", direction="in"))
            receiver.kill()
            receiver = Child(*r_args)
            children.append(receiver)
            receiver.wait_line("LISTEN")
            (restored,) = r_log.wait_for("transfer_restored", count=restored_before + 1, direction="in")[-1:]
            assert restored["chunks"] * CHUNK >= committed, (restored, committed)
        else:
            resumed_before = len(r_log.matching("transfer_resumed"))
            sender.kill()
            sender = Child(*s_args)
            children.append(sender)
            sender.wait_line("LISTEN")
            s_log.wait_for("transfer_restored", direction="out")
            # Its offer again is answered with a resume point at or past the contiguous prefix committed
            # by then: not from zero. The reported bytes also count chunks committed past a gap (a chunk
            # still in flight, or sent again after the first kill), at most a window of them: the resume
            # sends those again and the receiver drops them as duplicates.
            (resumed,) = r_log.wait_for("transfer_resumed", count=resumed_before + 1)[-1:]
            assert (resumed["resume_from"] + DEFAULT_WINDOW) * CHUNK >= committed, (resumed, committed)

    path = Path(receiver.wait_line("RECEIVED", timeout=4 * PATIENCE).split(maxsplit=1)[1])
    check = hashlib.blake2b(digest_size=32)
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            check.update(block)
    assert check.digest() == digest.digest()
    s_log.wait_for("transfer_completed", direction="out", timeout=PATIENCE)
    assert not list((tmp_path / "r" / "transfers").iterdir()), "a partial file was left behind"
