"""How long 1,000 concurrent sends hold an asyncio program's timers back, beside the ticker alone.

    python benchmarks/asyncio_ticker.py [--sends N] [--period 0.01] [--rounds R]

An orchestrator runs a ticker (a coroutine that wakes every ``--period``
seconds) on the same event loop as its node. The *delay* of a tick is how late
it woke (actual minus scheduled wake-up time). Measured per round:

- baseline: the ticker alone on the loop, for as long as the sends took;
- villagemesh: the ticker while ``N`` ``AsyncNode.send`` calls run concurrently
  (``asyncio.gather``) from node B, in this process, to node A (``villagemesh
  node``, its own process, as a peer agent's would be), and every handle is
  awaited to its end (A's handler returned and its outcome report came back).

``worst_ms`` is the worst tick delay over all rounds (the target: <= 20 ms with
1,000 sends), ``p99_ms`` the 99th percentile, ``ratio`` worst villagemesh /
worst baseline (same run). ``sends_per_s`` is how fast the N handles ended.
``threaded_worst_ms``: the same sends made with the blocking ``Node.send`` from
one worker thread while the loop only ticks: the node's own cost to the loop,
without the asyncio face. ``worst_while_handing_off_ms``: the worst delay until every send had returned
its handle (the loop's own work); after that the loop only waits while the
node's threads deliver (they share the interpreter lock with it).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, percentile

from villagemesh import AsyncNode, OutboxLimits, create_network
from villagemesh.aio import ended


async def ticker(period: float, stop: asyncio.Event, delays: list[float], times: list[float]) -> None:
    loop = asyncio.get_running_loop()
    due = loop.time() + period
    while not stop.is_set():
        await asyncio.sleep(max(0.0, due - loop.time()))
        delays.append(max(0.0, loop.time() - due))
        times.append(due)
        due += period


async def ticking(period: float, body: Any, times: list[float] | None = None) -> list[float]:
    """Run ``body()`` with the ticker beside it; the delays seen meanwhile (their due times into ``times``)."""
    delays: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.ensure_future(ticker(period, stop, delays, [] if times is None else times))
    await asyncio.sleep(period * 3)  # the ticker runs before the body starts
    try:
        await body()
    finally:
        stop.set()
        await tick
    return delays


async def main(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="vm-ticker-"))
    limits = OutboxLimits(per_peer_messages=max(1000, args.sends), total_messages=max(10_000, args.sends))
    out = base / "a.out"
    with open(out, "w") as sink:
        child = subprocess.Popen(
            [sys.executable, "-m", "villagemesh.cli", "node", "--data-dir", str(base / "a"), "--quiet"], stdout=sink
        )
    deadline = time.monotonic() + 30
    while not out.read_text().startswith("LISTEN"):
        if time.monotonic() > deadline or child.poll() is not None:
            raise SystemExit("the receiving node did not start")
        await asyncio.sleep(0.05)
    _, a_id, a_address = out.read_text().split("\n", 1)[0].split()
    b_node = create_network(
        "hybrid", name="b", data_dir=base / "b", lan=False, discovery_interval=0.3,
        bootstrap=(a_address,), outbox=limits, freeze_gc=not args.no_freeze_gc,
    )  # fmt: skip
    b = await AsyncNode(b_node).start()
    try:
        if not await b.wait_for_peers(1, 30):
            raise SystemExit("the nodes did not find each other")
        await (await b.send(a_id, b"warm-up"))
        worst_vm, worst_base, all_vm, all_base, rates = 0.0, 0.0, [], [], []
        worst_handoff, worst_threaded, all_threaded = 0.0, 0.0, []
        loop = asyncio.get_running_loop()
        for _ in range(args.rounds):
            took = 0.0
            handed_at = 0.0

            async def sends() -> None:
                nonlocal took, handed_at
                started = time.perf_counter()
                handles = await asyncio.gather(*(b.send(a_id, os.urandom(64)) for _ in range(args.sends)))
                handed_at = loop.time()
                statuses = await (ended(handles) if args.ended else asyncio.gather(*handles))
                took = time.perf_counter() - started
                if not all(s.delivered for s in statuses):
                    raise SystemExit(f"not all delivered: {[s.state for s in statuses if not s.delivered][:3]}")

            due: list[float] = []
            vm = await ticking(args.period, sends, due)
            worst_handoff = max([worst_handoff, *(d for d, t in zip(vm, due, strict=True) if t <= handed_at)])
            rates.append(args.sends / took)
            alone = await ticking(args.period, functools.partial(asyncio.sleep, took))

            def blocking_sends() -> None:
                handles = [b.node.send(a_id, os.urandom(64)) for _ in range(args.sends)]
                for handle in handles:
                    handle.result(60)

            threaded = await ticking(args.period, functools.partial(asyncio.to_thread, blocking_sends))
            all_threaded += threaded
            worst_threaded = max(worst_threaded, max(threaded))
            all_vm += vm
            all_base += alone
            worst_vm, worst_base = max(worst_vm, max(vm)), max(worst_base, max(alone))
            print(
                f"round: {args.sends} sends in {took * 1000:.0f} ms; worst tick delay {max(vm) * 1000:.2f} ms"
                f" (ticker alone {max(alone) * 1000:.2f} ms;"
                f" blocking sends from a thread {max(threaded) * 1000:.2f} ms)",
                flush=True,
            )
    finally:
        await b.stop()
        child.terminate()
        child.wait(30)
    emit(
        "asyncio_ticker",
        sends=args.sends,
        period_ms=args.period * 1000,
        rounds=args.rounds,
        worst_ms=round(worst_vm * 1000, 2),
        worst_while_handing_off_ms=round(worst_handoff * 1000, 2),
        p99_ms=round(percentile(all_vm, 99) * 1000, 2),
        baseline_worst_ms=round(worst_base * 1000, 2),
        baseline_p99_ms=round(percentile(all_base, 99) * 1000, 2),
        ratio=round(worst_vm / worst_base, 2) if worst_base else None,
        threaded_worst_ms=round(worst_threaded * 1000, 2),
        threaded_p99_ms=round(percentile(all_threaded, 99) * 1000, 2),
        sends_per_s=round(sorted(rates)[len(rates) // 2]),
        target_met=worst_vm <= 0.020,
        switch_interval_ms=sys.getswitchinterval() * 1000,
        freeze_gc=not args.no_freeze_gc,
        awaited_by="asyncio.gather" if not args.ended else "villagemesh.aio.ended",
        loadavg=os.getloadavg()[0],
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sends", type=int, default=1000)
    parser.add_argument("--period", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--no-freeze-gc", action="store_true", help="start node B with freeze_gc=False (full collections pause again)"
    )
    parser.add_argument(
        "--gather", dest="ended", action="store_false", help="await the handles with asyncio.gather, not aio.ended"
    )
    parser.add_argument(
        "--switch-interval", type=float, default=None, help="sys.setswitchinterval for this process (default: 5 ms)"
    )
    arguments = parser.parse_args()
    if arguments.switch_interval is not None:
        sys.setswitchinterval(arguments.switch_interval)
    asyncio.run(main(arguments))
