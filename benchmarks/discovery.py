"""Discovery convergence: how long N local nodes take until each knows all N-1 others, as a curve over N.

    python benchmarks/discovery.py [--sizes 10 50 100] [--topologies ring lan full] [--max-wait S]
                                   [--interval S] [--timeout S] [--placement process|thread]

Every node runs on 127.0.0.1 with its own data_dir and port. Placement
``process`` (the default) gives each node its own process, as nodes are
deployed: forked from this one before any node runs here (so no thread or
ZeroMQ context is forked), each process starting one node. Placement
``thread`` runs every node in this one process: harsher than any deployment,
since some 13 threads per node then share one interpreter lock, and a node's
I/O thread waits for the lock behind the other nodes' work (which shows as
latency, not CPU). Both are reported when asked for (``--placement``).

The clock starts when the last node's ``start()`` returned and stops when
the last node's registry stored its (N-1)-th distinct peer: the instant is the
timestamp of the registry's ``peer_discovered`` event in that node's
``events.jsonl`` (read incrementally, so polling costs the nodes nothing). In
thread placement each node's ``peers()`` is asked at the end to confirm the
view; in process placement the view is the registry's events. ``cpu_s`` is the
CPU time every node used from start to the end of the run (all processes).

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

In thread placement one process holds up to 100 nodes (about 13 threads each:
actors, three I/O loops, timers, ZeroMQ's I/O thread); see ``threads``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import resource
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, percentile

from villagemesh import create_network
from villagemesh.actors.lan.actor import lan_status
from villagemesh.errors import VillageMeshError
from villagemesh.node import NodeConfig, free_port

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


def node_config(
    topology: str, n: int, i: int, ports: list[int], beacon_port: int, args: argparse.Namespace, root: Path
) -> dict[str, Any]:
    """Keyword arguments of ``create_network`` for node ``i``."""
    return {
        "mode": "hybrid",
        "name": f"{topology}{n}-{i}",
        "data_dir": root / f"{topology}{n}-{i}",
        "host": "127.0.0.1",
        "port": ports[i],
        "bootstrap": seeds(topology, ports, i),
        "lan": topology == "lan",
        "lan_port": beacon_port,  # this run's own beacon port: no other run's nodes are heard
        "discovery_interval": args.interval,
        "discovery_timeout": args.timeout,
        # Every node here shares one source address (127.0.0.1), so the per-source
        # limits that protect a node from one flooding host would also throttle
        # its honest neighbours: a lab on one host raises them (as documented).
        "lan_rate_per_s": 1000.0,
        "lan_burst": 1000.0,
        "max_connections_per_source": 4096,
        "max_connections": 8192,
    }


def _cpu_s(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def _one_node(config: dict[str, Any], conn: Any) -> None:
    """A forked process's life: start the node, say so, stop it when told, report its CPU time."""
    node = create_network(config.pop("mode"), **config)
    try:
        node.start()
    except VillageMeshError as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("started", _cpu_s(resource.getrusage(resource.RUSAGE_SELF))))
    while conn.recv() == "cpu":
        conn.send(("cpu", _cpu_s(resource.getrusage(resource.RUSAGE_SELF))))
    try:
        status = lan_status(node._client(), timeout=30.0)
    except VillageMeshError:  # an overloaded machine: the counters are missing, not the run
        counts = {"status_unavailable": 1}
    else:
        counts = {f"responder_{k}": v for k, v in status.responder.items()}
        counts.update({f"exchange_{k}": v for k, v in status.exchange.items()})
    node.stop()
    conn.send(("stopped", (_cpu_s(resource.getrusage(resource.RUSAGE_SELF)), counts)))


def wait_converged(views: list[RegistryView], started: float, max_wait: float) -> None:
    while time.time() < started + max_wait:
        for view in views:
            view.update()
        if all(v.full_at is not None for v in views):
            return
        time.sleep(0.05)


def run(n: int, topology: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Start ``n`` nodes, measure convergence, stop them; the figures."""
    ports = [free_port() for _ in range(n)]
    beacon_port = free_port(socket.SOCK_DGRAM)
    configs = [node_config(topology, n, i, ports, beacon_port, args, root) for i in range(n)]
    views = [RegistryView(Path(c["data_dir"]) / "events.jsonl", n - 1) for c in configs]
    runner = run_in_processes if args.placement == "process" else run_in_thread
    started, start_all_s, sizes, extra = runner(configs, views, args)
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
        **extra,
    }


def run_in_thread(
    configs: list[dict[str, Any]], views: list[RegistryView], args: argparse.Namespace
) -> tuple[float, float, list[int], dict[str, Any]]:
    """Every node in this process."""
    nodes = [create_network(c.pop("mode"), **c) for c in configs]
    begin = time.perf_counter()
    cpu_before = _cpu_s(resource.getrusage(resource.RUSAGE_SELF))
    try:
        for node in nodes:
            node.start()
        started = time.time()
        start_all_s = time.perf_counter() - begin
        threads = threading.active_count()
        wait_converged(views, started, args.max_wait)
        sizes = [len(node.peers()) for node in nodes]
        cpu = _cpu_s(resource.getrusage(resource.RUSAGE_SELF)) - cpu_before
    finally:
        for node in reversed(nodes):
            node.stop()
    return started, start_all_s, sizes, {"threads": threads, "cpu_s": round(cpu, 2)}


NODE_MODULES = (
    "villagemesh.actors.acceptor.actor",
    "villagemesh.actors.app.actor",
    "villagemesh.actors.lan.actor",
    "villagemesh.actors.registry.actor",
    "villagemesh.actors.retrier.actor",
    "villagemesh.actors.sweeper.actor",
    "villagemesh.actors.websocket.actor",
)
"""What a node imports when it starts: imported here once before forking (as a fork server
would), so 50 processes do not each spend ~0.16 s of the two CPUs importing aiohttp & co."""


def run_in_processes(
    configs: list[dict[str, Any]], views: list[RegistryView], args: argparse.Namespace
) -> tuple[float, float, list[int], dict[str, Any]]:
    """A forked process per node."""
    for module in NODE_MODULES:
        importlib.import_module(module)
    fork = multiprocessing.get_context("fork")
    pipes, procs = [], []
    begin = time.perf_counter()
    try:
        for config in configs:
            parent, child = fork.Pipe()
            proc = fork.Process(target=_one_node, args=(config, child), daemon=True)
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        cpu_at_start = 0.0
        for config, pipe in zip(configs, pipes, strict=True):
            state, detail = pipe.recv()
            if state != "started":
                raise VillageMeshError(f"node {config['name']} did not start: {detail}")
            cpu_at_start += detail
        started = time.time()
        start_all_s = time.perf_counter() - begin
        wait_converged(views, started, args.max_wait)
        for pipe in pipes:
            pipe.send("cpu")
        cpu_until_converged = sum(pipe.recv()[1] for pipe in pipes) - cpu_at_start
        for view in views:
            view.update()
        sizes = [len(v.peers) for v in views]
        for pipe in pipes:
            pipe.send("stop")
        cpu, counts = 0.0, Counter[str]()
        for pipe in pipes:
            node_cpu, node_counts = pipe.recv()[1]
            cpu += node_cpu
            counts.update(node_counts)
    finally:
        for pipe in pipes:
            try:
                pipe.send("stop")  # a node still waiting (a run cut short) stops too
            except OSError:
                continue  # its process has ended already
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    extra = {
        "processes": len(procs),
        "cpu_s": round(cpu, 2),
        "cpu_after_start_s": round(cpu - cpu_at_start, 2),
        "cpu_to_converge_s": round(cpu_until_converged, 2),
        "counts": dict(sorted(counts.items())),
    }
    return started, start_all_s, sizes, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--topologies", nargs="+", choices=["ring", "lan", "full"], default=["ring", "lan", "full"])
    parser.add_argument("--max-wait", type=float, default=20.0, help="seconds before a run counts as not converged")
    defaults = NodeConfig(data_dir=Path("."))
    parser.add_argument(
        "--interval", type=float, default=defaults.discovery_interval, help="discovery_interval (node default)"
    )
    parser.add_argument(
        "--timeout", type=float, default=defaults.discovery_timeout, help="discovery_timeout (node default)"
    )
    parser.add_argument("--full-max-n", type=int, default=50, help="largest N run with full seed lists")
    parser.add_argument(
        "--placement", choices=["process", "thread"], default="process", help="a process per node, or all in one"
    )
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
                    f"start {figures['start_all_s']} s  cpu {figures['cpu_s']} s"
                    f" ({figures.get('cpu_after_start_s', '-')} s after the nodes started)",
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
        placement=args.placement,
        discovery_interval=args.interval,
        max_wait_s=args.max_wait,
        max_rss_mb=round(rss_mb),
    )


if __name__ == "__main__":
    main()
