"""Many hosts on one machine: discovery convergence, delivery throughput and RSS per node, for 10, 25 and 50 hosts.

    python benchmarks/scale.py [--sizes 10 25 50] [--topologies lan seed] [--messages 100] [--plot docs/scale.png]

Every node is a process of its own in a network namespace of its own (``villagemesh.lab``:
a private bridge, an address per host, so no per-source limit is shared), with the node's
default discovery settings (interval 2 s, round timeout 1.5 s, fast start 0.25 s). Needs root.

- **convergence**: the clock starts when the last node serves (its ``listen`` line) and stops
  at the instant the last node's registry stored its (N-1)-th distinct peer (the timestamp of
  its ``peer_discovered`` event in its ``events.jsonl``). Topologies: ``lan`` (no seeds,
  multicast beacons only) and ``seed`` (hosts 2..N know host 1's address, host 1 none: the
  rest is peer exchange). ``lan-plug`` and ``seed-plug``: the same, but every cable is out
  while the nodes start and all are plugged in at once: the clock starts then (the network
  appears under nodes that are up, their fast start long over). Also ``cold_start_s``: from
  spawning the first process (all N started at once, as after a power cut) to convergence;
  ``start_spread_s``: from the first node serving to the last (N processes on 2 vCPUs).
- **throughput**: once converged, every host sends ``--messages`` to the next one (a ring,
  ``send_many``); messages handled per second by all hosts together, from the first send to
  the last message handled.
- **RSS per node**: ``VmRSS`` of each node process once its messages were handled (mean, max),
  and CPU seconds per node from start to then.

Baseline, in the same run: the same measurements for 2 hosts (one pair, nothing shared but
the machine): how the cost per node grows with N is the ratio to it. Target (issue 25): 50
hosts converge within 3 s. Ends with one JSON line; ``--plot`` writes the curve as a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit

from villagemesh.lab import Cluster, can_make_namespaces

DEFAULTS: dict[str, Any] = {
    "discovery_interval": 2.0,
    "discovery_timeout": 1.5,
    "discovery_fast_start": 0.25,
}
"""The node's own defaults (the lab's fast settings are for tests)."""


TOPOLOGIES = ("lan", "seed", "lan-plug", "seed-plug")


def _when(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def converged_at(host: Any, others: set[str]) -> float | None:
    """Wall time at which host's registry had logged every one of ``others`` (None: not yet)."""
    missing = set(others)
    for event in host.events():
        if event["event"] == "peer_discovered" and event.get("peer_id") in missing:
            missing.discard(event["peer_id"])
            if not missing:
                return _when(event["timestamp"])
    return None


def proc_figures(host: Any) -> tuple[float, float]:
    """(RSS in MiB, CPU seconds) of host's node process."""
    assert host.proc is not None
    pid = host.proc.pid
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss_kb / 1024, cpu


def measure(n: int, topology: str, messages: int, max_wait: float, base: Path) -> dict[str, Any]:
    kind, plugged = topology.removesuffix("-plug"), topology.endswith("-plug")
    bootstrap = "none" if kind == "lan" else "first"
    t_spawn = time.time()
    lab = Cluster(n, base / f"{topology}-{n}", lan=kind == "lan", bootstrap=bootstrap, **DEFAULTS)
    lab.up(start=not plugged)
    try:
        if plugged:  # every cable out while the nodes start; all plugged in at once
            lab.cut(*lab.hosts)
            lab.start(lab.hosts)
            time.sleep(2 * DEFAULTS["discovery_interval"])  # every node's fast start is over
            lab.restore(*lab.hosts)  # one ip -batch: every cable within milliseconds
        t_started = time.time() if plugged else max(h.listening_at or 0.0 for h in lab)
        ids = {h.node_id for h in lab}
        deadline = time.monotonic() + max_wait
        times: dict[int, float] = {}
        while len(times) < n and time.monotonic() < deadline:
            for host in lab:
                if host.i not in times:
                    at = converged_at(host, ids - {host.node_id})
                    if at is not None:
                        times[host.i] = at
            time.sleep(0.1)
        convergence = max(0.0, max(times.values()) - t_started) if len(times) == n else None
        per_node = sorted(max(0.0, t - t_started) for t in times.values())
        t0 = time.monotonic()
        for host in lab:
            host.send(lab[host.i % n + 1].node_id, messages)
        lab.wait_delivered(timeout=300)
        elapsed = time.monotonic() - t0
        lab.check_exactly_once()
        figures = [proc_figures(h) for h in lab]
        listening = [h.listening_at or t_started for h in lab]
    finally:
        lab.down()
    rss = [r for r, _ in figures]
    cpu = [c for _, c in figures]
    return {
        "n": n,
        "topology": topology,
        "convergence_s": None if convergence is None else round(convergence, 3),
        "p50_node_s": round(per_node[len(per_node) // 2], 3) if per_node else None,
        "converged_nodes": len(times),
        "cold_start_s": None if convergence is None else round(max(times.values()) - t_spawn, 3),
        "start_spread_s": round(t_started - min(h_at for h_at in listening), 3),
        "throughput_msgs_per_s": round(n * messages / elapsed, 1),
        "rss_mib_mean": round(sum(rss) / n, 1),
        "rss_mib_max": round(max(rss), 1),
        "cpu_s_per_node": round(sum(cpu) / n, 2),
    }


def plot(rows: list[dict[str, Any]], baseline: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for topology in sorted({r["topology"] for r in rows}):
        mine = [r for r in rows if r["topology"] == topology]
        ns = [r["n"] for r in mine]
        axes[0].plot(ns, [r["convergence_s"] for r in mine], "o-", label=topology)
        axes[1].plot(ns, [r["throughput_msgs_per_s"] for r in mine], "o-", label=topology)
        axes[2].plot(ns, [r["rss_mib_mean"] for r in mine], "o-", label=f"{topology} RSS (MiB)")
        axes[2].plot(ns, [r["cpu_s_per_node"] * 10 for r in mine], "s--", label=f"{topology} CPU x10 (s)")
    axes[0].axhline(3.0, color="red", linestyle=":", label="target 3 s at 50")
    for ax, title in zip(axes, ("convergence (s)", "messages handled / s, all hosts", "per node"), strict=True):
        ax.set_xlabel("hosts")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for b in baseline.values():
        axes[1].axhline(b["throughput_msgs_per_s"], linestyle=":", color="grey")
        axes[2].axhline(b["rss_mib_mean"], linestyle=":", color="grey")
    fig.suptitle("villagemesh in network namespaces: one node process per host, 2 vCPUs (grey: 2-host baseline)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES), choices=TOPOLOGIES)
    parser.add_argument("--messages", type=int, default=200, help="per host, to the next host")
    parser.add_argument("--max-wait", type=float, default=60.0)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    reason = can_make_namespaces()
    if reason is not None:
        sys.exit(f"scale.py needs network namespaces: {reason}")
    base = Path(tempfile.mkdtemp(prefix="villagemesh-scale-"))
    baseline = {t: measure(2, t, args.messages, args.max_wait, base) for t in args.topologies}
    print(json.dumps({"baseline": baseline}), flush=True)
    rows = []
    for n in args.sizes:
        for topology in args.topologies:
            row = measure(n, topology, args.messages, args.max_wait, base)
            b = baseline[topology]
            row["throughput_vs_2"] = round(row["throughput_msgs_per_s"] / b["throughput_msgs_per_s"], 2)
            row["rss_vs_2"] = round(row["rss_mib_mean"] / b["rss_mib_mean"], 2)
            row["cpu_vs_2"] = round(row["cpu_s_per_node"] / b["cpu_s_per_node"], 2) if b["cpu_s_per_node"] else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.plot is not None:
        plot(rows, baseline, args.plot)
    at50 = [r for r in rows if r["n"] == 50]
    emit(
        "scale",
        rows=rows,
        baseline=baseline,
        target={"hosts": 50, "convergence_s": 3.0},
        met=bool(at50) and all(r["convergence_s"] is not None and r["convergence_s"] <= 3.0 for r in at50),
    )


if __name__ == "__main__":
    main()
