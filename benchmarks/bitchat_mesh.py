"""BitChat mesh relay: delivery ratio and link writes per delivered message, ours beside plain flooding.

    python benchmarks/bitchat_mesh.py [--sizes 10 50 100] [--graphs 3] [--messages 20] [--seed 1]

Runs on the deterministic in-memory radio (:mod:`villagemesh.actors.bitchat.sim`),
so the figures are counts, not timings, and the same seed gives the same
numbers. For each size, ``--graphs`` random geometric graphs (n points in the
unit square, linked closer than the size's radius) are drawn until each is
connected and its diameter is at most 6 hops (what TTL 7 reaches under
BitChat's dense-neighbourhood cap of 5). On each graph both relays run the same
script: every node announces its neighbours once (TTL 1, not counted), then
``--messages`` broadcasts from rotating sources, each run until the air is quiet.

* ``ours``: :class:`~villagemesh.actors.bitchat.state.MeshState` with its
  defaults (BitChat's jitter and TTL caps, neighbour-coverage pruning: a relay
  is cancelled once every neighbour heard a copy, and goes only to neighbours
  not known to have one).
* ``flooding`` (the baseline, same run, same graphs): every node relays every
  new packet once to all its links but the one it came in on.

Figures per size and overall: ``delivery_ratio`` (nodes reached / nodes that
should be, source excluded), ``writes_per_delivery`` (link writes, BLE's unit
of cost, / deliveries), and ``transmissions_ratio`` = ours / flooding writes
per delivery. Target (issue 22): delivery 100 % on connected graphs with
``transmissions_ratio`` <= 0.5.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit

from villagemesh.actors.bitchat.sim import FLOODING, SimMesh, connected, diameter, random_geometric

RADIUS = {10: 0.5, 50: 0.3, 100: 0.22}
"""Per size: a radius giving mostly connected graphs of diameter <= 6 (mean degree 3-13)."""
MAX_DIAMETER = 6


def graphs(n: int, count: int, rng: random.Random) -> list[list[tuple[int, int]]]:
    radius = RADIUS.get(n, (7 / n) ** 0.5)
    found = []
    while len(found) < count:
        edges = random_geometric(n, radius, rng)
        if connected(n, edges) and diameter(n, edges) <= MAX_DIAMETER:
            found.append(edges)
    return found


def run(n: int, edges: list[tuple[int, int]], messages: int, seed: int, config: Any) -> tuple[int, int, int]:
    """(deliveries, deliveries expected, link writes) of ``messages`` broadcasts."""
    mesh = SimMesh(n, edges, seed=seed, config=config)
    mesh.announce_all()
    before = mesh.air.frames
    keys = []
    for m in range(messages):
        keys.append(mesh.send((m * 7) % n, f"message {m}".encode()))
        mesh.run()
    delivered = sum(mesh.reached(key) - 1 for key in keys)
    return delivered, messages * (n - 1), mesh.air.frames - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--graphs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    per_size: dict[str, Any] = {}
    totals = {"ours": [0, 0, 0], "flooding": [0, 0, 0]}
    for n in args.sizes:
        sums = {"ours": [0, 0, 0], "flooding": [0, 0, 0]}
        degrees = []
        for index, edges in enumerate(graphs(n, args.graphs, rng)):
            degrees.append(2 * len(edges) / n)
            for name, config in (("ours", None), ("flooding", FLOODING)):
                result = run(n, edges, args.messages, args.seed * 1000 + index, config)
                for i, value in enumerate(result):
                    sums[name][i] += value
                    totals[name][i] += value
        figures = {name: _figures(*values) for name, values in sums.items()}
        figures["transmissions_ratio"] = _ratio(figures)
        figures["mean_degree"] = round(sum(degrees) / len(degrees), 1)
        per_size[str(n)] = figures
        print(f"n={n}: {figures}", file=sys.stderr)
    overall = {name: _figures(*values) for name, values in totals.items()}
    ratio = _ratio(overall)
    emit(
        "bitchat_mesh",
        delivery_ratio=overall["ours"]["delivery_ratio"],
        transmissions_ratio=ratio,
        baseline_delivery_ratio=overall["flooding"]["delivery_ratio"],
        writes_per_delivery=overall["ours"]["writes_per_delivery"],
        baseline_writes_per_delivery=overall["flooding"]["writes_per_delivery"],
        sizes=per_size,
        graphs_per_size=args.graphs,
        messages_per_graph=args.messages,
        seed=args.seed,
        met=overall["ours"]["delivery_ratio"] == 1.0 and ratio <= 0.5,
    )


def _figures(delivered: int, expected: int, writes: int) -> dict[str, float]:
    return {
        "delivery_ratio": round(delivered / expected, 4),
        "writes_per_delivery": round(writes / max(delivered, 1), 3),
    }


def _ratio(figures: dict[str, Any]) -> float:
    return round(figures["ours"]["writes_per_delivery"] / figures["flooding"]["writes_per_delivery"], 3)


if __name__ == "__main__":
    main()
