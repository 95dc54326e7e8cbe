"""What a peer that is down costs its sender: ``Node.send`` to it, and the retrier's attempts per second.

    python benchmarks/down_peer.py [--count N] [--idle S] [--no-libp2p]

Two nodes on 127.0.0.1 with the test settings (ack timeout 1 s, backoff 0.05 s
doubling to 0.5 s, 60 attempts). The baseline, in the same run: ``--count``
sends to the receiver while it is up (each acked). Then the receiver stops and
``--count`` more sends go to it; ``--idle`` seconds later the retrier's
``sent`` counter has moved by ``attempts_per_s`` times that (each attempt a
Transmit to one transport, failing with a refused connection).

Figures: ``send_up_p50_ms`` / ``send_up_p90_ms`` (the baseline),
``send_down_p50_ms`` / ``send_down_p90_ms``, ``attempts_per_s`` while the
messages wait, and the retrier's ``unreachable_peers`` / ``held`` / ``probes``
at the end. ``load_avg``: the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import emit, percentile

from tests.integration._nodes import FAST
from villagemesh import create_network
from villagemesh.node import free_port


def timed_sends(node: object, peer: str, count: int, tag: str) -> list[float]:
    samples = []
    for i in range(count):
        start = time.perf_counter()
        node.send(peer, f"{tag}{i}".encode())  # type: ignore[attr-defined]
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--idle", type=float, default=2.0)
    parser.add_argument("--no-libp2p", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    base = Path(tempfile.mkdtemp(prefix="down-peer-"))
    port_r, port_s = free_port(), free_port()
    libp2p = not args.no_libp2p
    common = {"host": "127.0.0.1", "libp2p": libp2p, **FAST}
    r = create_network(
        "hybrid", name="r", data_dir=base / "r", port=port_r, bootstrap=(f"127.0.0.1:{port_s}",), **common
    )
    got = threading.Semaphore(0)
    r.subscribe("*", lambda message: got.release())
    r.start()
    s = create_network(
        "hybrid", name="s", data_dir=base / "s", port=port_s, bootstrap=(f"127.0.0.1:{port_r}",), **common
    )
    s.start()
    r_up = True
    try:
        if not s.wait_for_peers(1, 30):
            raise SystemExit("the nodes did not find each other in 30 s")
        s.send(r.node_id, b"warm-up").result(30)
        got.acquire(timeout=30)
        up = timed_sends(s, r.node_id, args.count, "up")
        for _ in range(args.count):
            if not got.acquire(timeout=60):
                raise SystemExit("the baseline's messages did not all arrive")
        r.stop()
        r_up = False
        down = timed_sends(s, r.node_id, args.count, "down")
        before = s.network_status()["retrier"]["sent"]
        threading.Event().wait(args.idle)
        status = s.network_status()["retrier"]
    finally:
        s.stop()
        if r_up:
            r.stop()
    emit(
        "down_peer",
        count=args.count,
        libp2p=libp2p,
        send_up_p50_ms=round(percentile(up, 50) * 1000, 3),
        send_up_p90_ms=round(percentile(up, 90) * 1000, 3),
        send_down_p50_ms=round(percentile(down, 50) * 1000, 3),
        send_down_p90_ms=round(percentile(down, 90) * 1000, 3),
        attempts_per_s=round((status["sent"] - before) / args.idle, 1),
        unreachable_peers=status.get("unreachable_peers"),
        held=status.get("held"),
        probes=status.get("probes"),
        load_avg=[round(load_before, 2), round(os.getloadavg()[0], 2)],
    )


if __name__ == "__main__":
    main()
