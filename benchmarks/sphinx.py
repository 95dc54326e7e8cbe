"""Sphinx per-hop unwraps per second beside the raw X25519 operations, measured in the same run.

    python benchmarks/sphinx.py [--packets N] [--rounds R]

* unwrap: :func:`villagemesh.protocols.sphinx.unwrap` of distinct 2 KB-payload
  packets (2,382 bytes) at the first of 3 hops, each into one replay cache;
* baseline: the two X25519 scalar multiplications a hop cannot avoid (the shared
  secret, and the blinding of α), raw ``nacl.bindings.crypto_scalarmult``, same
  number of times, same process, alternating rounds;
* ``x25519_ratio`` = unwraps/s ÷ (X25519 pairs)/s: the share of the two
  multiplications' own ceiling that a whole hop reaches (1.0 would be a hop
  costing nothing but its X25519);
* the same unwraps in 1 and 2 processes at once (``scaling`` = 2-process total ÷ 1).

* end to end: five BetaNet relays (the actor, each behind its own acceptor, on
  one bus, Noise links over loopback), delays off; one envelope at a time from
  the first to the last through the three others, ``Transmit`` to ``Received``:
  p50 / p99 ms over ``--e2e`` envelopes. For reference, the same run's cost of
  the four unwraps and the packet and SURB building alone (``crypto_ms``).

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time

import nacl.bindings

from villagemesh.protocols.sphinx import Hop, ReplayCache, create_packet, unwrap
from villagemesh.protocols.sphinx.crypto import x25519_base


def _packets(n: int) -> tuple[bytes, list[bytes]]:
    secrets = [os.urandom(32) for _ in range(3)]
    path = [Hop(os.urandom(16), x25519_base(s)) for s in secrets]
    return secrets[0], [create_packet(path, os.urandom(2014), [0, 0], epoch=1) for _ in range(n)]


def _time_unwraps(secret: bytes, packets: list[bytes]) -> float:
    cache = ReplayCache(capacity=len(packets))
    start = time.perf_counter()
    for p in packets:
        unwrap(p, secret, cache)
    return len(packets) / (time.perf_counter() - start)


def _time_x25519_pairs(n: int) -> float:
    scalar, point = os.urandom(32), x25519_base(os.urandom(32))
    mult = nacl.bindings.crypto_scalarmult
    start = time.perf_counter()
    for _ in range(n):
        mult(scalar, point)
        mult(scalar, point)
    return n / (time.perf_counter() - start)


def _worker(n: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    secret, packets = _packets(n)
    barrier_start = time.perf_counter()
    rate = _time_unwraps(secret, packets)
    out.put((rate, barrier_start))


def _in_processes(count: int, n: int) -> float:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(n, out)) for _ in range(count)]
    for p in procs:
        p.start()
    rates = [out.get(timeout=600)[0] for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return sum(rates)


def _e2e(count: int) -> tuple[float, float]:
    """p50, p99 ms of one envelope through 3 mixes, Transmit to Received (five relays on one bus)."""
    import queue
    import tempfile
    from pathlib import Path

    from villagemesh.actors.acceptor.actor import AcceptorActor, acceptor_status
    from villagemesh.actors.betanet.actor import BetanetActor
    from villagemesh.actors.betanet.state import format_address, mix_secret
    from villagemesh.actors.core.base import Actor, ActorContext, Scheduler
    from villagemesh.actors.core.bus import Bus
    from villagemesh.actors.core.secure.keys import NodeKeys
    from villagemesh.actors.core.transport import Received, Transmit
    from villagemesh.protocols.envelope import Message, Priority, encode_message
    from villagemesh.supervision.log import EventLog

    class Sink(Actor):
        def handle(self, msg: object) -> None:
            self.ctx.config["queue"].put(msg)

    work = Path(tempfile.mkdtemp(prefix="vm-sphinx-"))
    bus, scheduler = Bus("bench-sphinx"), Scheduler()
    log = EventLog(bus.node, work / "events.jsonl", human=False)

    def start(cls: type[Actor], name: str, **config: object) -> object:
        bus.open_mailbox(name)
        return cls.start(ActorContext(bus=bus, name=name, log=log, scheduler=scheduler, config=config))

    inboxes, keys, ports = [], [NodeKeys.generate() for _ in range(5)], []
    for n in range(5):
        inboxes.append(queue.Queue())
        start(Sink, f"sink-{n}", queue=inboxes[-1])
        start(AcceptorActor, f"acceptor-{n}", routes={"secure": f"betanet-{n}"})
        ports.append(acceptor_status(bus.client(), f"acceptor-{n}").port)
    addresses = [format_address("127.0.0.1", ports[n], x25519_base(mix_secret(keys[n].static_key))) for n in range(5)]
    directory = [[keys[n].node_id, addresses[n]] for n in range(5)]
    for n in range(5):
        start(
            BetanetActor, f"betanet-{n}", keys=keys[n].to_bytes(), host="127.0.0.1", port=ports[n],
            replay_path=str(work / f"b{n}.sqlite3"), deliver_to=f"sink-{n}", mixnodes=directory,
        )
    client, samples = bus.client(), []
    try:
        for i in range(count + 10):
            msg = Message(os.urandom(16), "DATA", keys[0].node_id, None, Priority.NORMAL, time.time(), 60.0, None, b"x")
            start_at = time.perf_counter()
            client.tell(
                "betanet-0",
                Transmit(msg.id, keys[4].node_id, addresses[4], encode_message(msg), "sink-0", report_success=False),
            )
            while not isinstance(inboxes[4].get(timeout=30), Received):
                pass
            if i >= 10:  # the first ten dial the links
                samples.append((time.perf_counter() - start_at) * 1000)
    finally:
        import pykka

        pykka.ActorRegistry.stop_all(block=True, timeout=10)
        bus.close()
        scheduler.close()
        log.close()
    samples.sort()
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--e2e", type=int, default=300)
    args = parser.parse_args(argv)
    secret, packets = _packets(args.packets)
    unwrap_rates, pair_rates = [], []
    for _ in range(args.rounds):
        unwrap_rates.append(_time_unwraps(secret, packets))
        pair_rates.append(_time_x25519_pairs(args.packets))
    unwraps = statistics.median(unwrap_rates)
    pairs = statistics.median(pair_rates)
    one = _in_processes(1, args.packets)
    two = _in_processes(2, args.packets)
    e2e_p50, e2e_p99 = _e2e(args.e2e)
    load = os.getloadavg()
    print(f"unwraps/s (one core, 2 KB payload)  {unwraps:,.0f}   rounds {[round(r) for r in unwrap_rates]}")
    print(f"raw X25519 pairs/s (same run)       {pairs:,.0f}   x25519_ratio {unwraps / pairs:.2f}")
    print(f"processes: 1 -> {one:,.0f}/s, 2 -> {two:,.0f}/s (scaling {two / one:.2f})   load {load[0]:.2f}")
    print(f"end to end through 3 mixes (delays off): p50 {e2e_p50:.2f} ms  p99 {e2e_p99:.2f} ms")
    print(
        json.dumps(
            {
                "benchmark": "sphinx",
                "packets": args.packets,
                "rounds": args.rounds,
                "payload_bytes": 2048,
                "unwraps_per_s": round(unwraps),
                "x25519_pairs_per_s": round(pairs),
                "x25519_ratio": round(unwraps / pairs, 3),
                "unwraps_per_s_1_process": round(one),
                "unwraps_per_s_2_processes": round(two),
                "scaling": round(two / one, 3),
                "e2e_p50_ms": round(e2e_p50, 3),
                "e2e_p99_ms": round(e2e_p99, 3),
                "e2e_envelopes": args.e2e,
                "load_avg": round(load[0], 2),
                "targets": {"unwraps_per_s": 7000},
                "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
