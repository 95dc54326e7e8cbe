"""Discovery convergence: how long N local nodes take until each knows all N-1 others, as a curve over N.

    python benchmarks/discovery.py [--sizes 10 50 100] [--topologies ring lan full] [--max-wait S]
                                   [--interval S] [--timeout S]

Every node runs in this one process on 127.0.0.1 (each its own data_dir, its
own port). The clock starts when the last ``start()`` returns and stops when
the last node's registry stored its (N-1)-th distinct peer: the instant is the
timestamp of the registry's ``peer_discovered`` event in that node's
``events.jsonl`` (read incrementally, so polling costs the nodes nothing);
at the end each node's ``peers()`` is asked to confirm the view.

Topologies (how a node learns its first peers):

* ``ring``: node *i* is seeded with the acceptors of *i+1, i+2, i+3* (mod N), so
  no seed list holds everyone: a full view needs peers to pass on what they
  know (peer exchange). Symmetric discovery (a node probes back whoever
  probed it) gives each node 6 peers at most without it.
* ``lan``: no seeds; ``lan=True`` signed UDP multicast beacons on loopback.
* ``full``: every node seeded with every other acceptor (the static list of
  the 10-node integration test): the reference for what probing alone costs.
  Run up to ``--full-max-n`` (50): at 100, every round is 9,900 probes (19,800
  with the probes back), both ends in this one process, and it runs out of file
  descriptors (EMFILE at a limit of 20,000).

Where a topology does not converge within ``--max-wait`` seconds its figure is
``null`` and the view sizes reached (min/mean/max peers per node) are shown.
Target (issue 4): 50 nodes converge within 3 s (``met`` is judged on the
first topology listed, ``ring`` by default, the one that needs no global list).

One process holds 100 nodes (about 13 threads each: actors, three I/O loops,
timers, ZeroMQ's I/O thread); see the ``machine`` and ``threads`` figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, percentile

from villagemesh import create_network
from villagemesh.errors import VillageMeshError
from villagemesh.node import free_port

TARGET_N, TARGET_S = 50, 3.0


# free_port (below the ephemeral range, never the same twice) is the node's own.


def _epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


class RegistryView:
    """A node's known peers as its event log tells them (read incrementally), and when it became full."""

    def __init__(self, path: Path, wanted: int) -> None:
        self.path, self.wanted = path, wanted
        self.offset = 0
        self.peers: set[str] = set()
        self.full_at: float | None = None

    def update(self) -> None:
        if self.full_at is not None or not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        self.offset += end
        for line in data[:end].splitlines():
            event = json.loads(line)
            name = event["event"]
            if name == "peer_discovered" and "peer_id" in event:  # the registry's (beacons log node_id)
                self.peers.add(event["peer_id"])
                if len(self.peers) >= self.wanted:
                    self.full_at = _epoch(event["timestamp"])
                    return
            elif name in ("peer_forgotten", "peer_expired"):
                self.peers.discard(event["peer_id"])


def seeds(topology: str, ports: list[int], i: int) -> tuple[str, ...]:
    """The bootstrap list of node ``i``."""
    n = len(ports)
    if topology == "ring":
        picked = sorted({(i + k) % n for k in (1, 2, 3)} - {i})
    elif topology == "full":
        picked = [j for j in range(n) if j != i]
    else:
        picked = []
    return tuple(f"127.0.0.1:{ports[j]}" for j in picked)


def run(n: int, topology: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Start ``n`` nodes, measure convergence, stop them; the figures."""
    ports = [free_port() for _ in range(n)]
    beacon_port = free_port(socket.SOCK_DGRAM)  # this run's own beacon port: no other run's nodes are heard
    nodes = [
        create_network(
            "hybrid",
            name=f"{topology}{n}-{i}",
            data_dir=root / f"{topology}{n}-{i}",
            host="127.0.0.1",
            port=ports[i],
            bootstrap=seeds(topology, ports, i),
            lan=topology == "lan",
            lan_port=beacon_port,
            discovery_interval=args.interval,
            discovery_timeout=args.timeout,
            # Every node here shares one source address (127.0.0.1), so the per-source
            # limits that protect a node from one flooding host would also throttle
            # its honest neighbours: a lab on one host raises them (as documented).
            lan_rate_per_s=1000.0,
            lan_burst=1000.0,
            max_connections_per_source=4096,
            max_connections=8192,
        )
        for i in range(n)
    ]
    views = [RegistryView(node.log_path, n - 1) for node in nodes]
    begin = time.perf_counter()
    try:
        for node in nodes:
            node.start()
        started = time.time()
        start_all_s = time.perf_counter() - begin
        threads = threading.active_count()
        while time.time() < started + args.max_wait:
            for view in views:
                view.update()
            if all(v.full_at is not None for v in views):
                break
            time.sleep(0.05)
        sizes = [len(node.peers()) for node in nodes]
    finally:
        for node in reversed(nodes):
            node.stop()
    done = [v.full_at - started for v in views if v.full_at is not None]
    converged = len(done) == n and min(sizes) >= n - 1
    return {
        "n": n,
        "converge_s": round(max(done), 3) if converged else None,
        "node_p50_s": round(percentile(done, 50), 3) if done else None,
        "nodes_converged": len(done),
        "view_min": min(sizes),
        "view_mean": round(sum(sizes) / n, 1),
        "view_max": max(sizes),
        "start_all_s": round(start_all_s, 2),
        "threads": threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--topologies", nargs="+", choices=["ring", "lan", "full"], default=["ring", "lan", "full"])
    parser.add_argument("--max-wait", type=float, default=20.0, help="seconds before a run counts as not converged")
    parser.add_argument("--interval", type=float, default=1.0, help="discovery_interval of every node")
    parser.add_argument("--timeout", type=float, default=1.0, help="discovery_timeout of every node")
    parser.add_argument("--full-max-n", type=int, default=50, help="largest N run with full seed lists")
    args = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {t: [] for t in args.topologies}
    with tempfile.TemporaryDirectory(prefix="vm-discovery-") as tmp:
        for topology in args.topologies:
            for n in args.sizes:
                if topology == "full" and n > args.full_max_n:
                    continue
                try:
                    figures = run(n, topology, args, Path(tmp))
                except (VillageMeshError, OSError) as exc:  # a start() timed out, out of descriptors: report, go on
                    figures = {"n": n, "converge_s": None, "error": f"{type(exc).__name__}: {exc}"}
                    print(f"{topology:>5} N={n:<4} failed: {figures['error']}", flush=True)
                    results[topology].append(figures)
                    continue
                results[topology].append(figures)
                conv = figures["converge_s"]
                print(
                    f"{topology:>5} N={n:<4} converge {'—' if conv is None else f'{conv:.2f} s':>8}  "
                    f"converged {figures['nodes_converged']}/{n}  view min/mean/max "
                    f"{figures['view_min']}/{figures['view_mean']}/{figures['view_max']}  "
                    f"start {figures['start_all_s']} s  threads {figures['threads']}",
                    flush=True,
                )
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    primary = args.topologies[0]
    curve = {str(f["n"]): f["converge_s"] for f in results[primary]}
    at_target = curve.get(str(TARGET_N))
    emit(
        "discovery",
        topology=primary,
        converge_s=curve,
        target={"n": TARGET_N, "converge_s": TARGET_S},
        met=at_target is not None and at_target <= TARGET_S,
        by_topology={t: {str(f["n"]): f for f in figs} for t, figs in results.items()},
        discovery_interval=args.interval,
        max_wait_s=args.max_wait,
        max_rss_mb=round(rss_mb),
    )


if __name__ == "__main__":
    main()
