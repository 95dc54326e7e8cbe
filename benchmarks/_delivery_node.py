"""One villagemesh node in its own process for ``benchmarks/delivery.py``, driven by lines on stdin.

    python benchmarks/_delivery_node.py --data-dir D --name N --port P --bootstrap H:P [--synchronous FULL]

Prints ``READY <node_id>`` once started, then answers each command with one line:

* ``wait_peer <node_id>`` → ``PEER`` once that peer is known;
* ``expect <n>``          → ``EXPECTING``; then ``GOT <n>`` (unprompted) when the n-th message was handled;
* ``echo <udp port>``     → ``ECHOING``: the handler also sends each message's first 8 bytes to that
  loopback port (so the sender sees its handler run, for the one-at-a-time latency);
* ``run <n> <size>``      → ``RAN <accepted s> <delivered s>``: ``n`` messages of ``size`` bytes to the
  peer, as ``asyncio.gather`` over ``Node.asend`` (one sending thread), until every handle is delivered;
* ``run_many <n> <size>`` → the same, as one ``Node.send_many`` (it returns once all are stored), then
  ``villagemesh.aio.ended`` over the handles (one future for all);
* ``latency <n> <size> <udp port>`` → ``LAT <ms> ...``: ``n`` times: send one message, wait for its
  handle (the end-to-end ack) and for the receiver's echo (its handler ran);
* ``stats``               → ``STATS <cpu s> <voluntary switches> <involuntary switches>`` of this process
  (every thread: ``getrusage(RUSAGE_SELF)``);
* ``quit``                → stops the node and exits.

Once started it calls ``gc.freeze()`` unless ``VM_BENCH_GC_FREEZE=0`` (see delivery.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from villagemesh import create_network
from villagemesh.aio import ended

WAIT = 300.0


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Handler:
    """Counts handled messages; prints GOT at the expected count; echoes over UDP when asked."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.echo: tuple[str, int] | None = None
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._lock = threading.Lock()

    def __call__(self, message: Any) -> None:
        if self.echo is not None:
            self.udp.sendto(message.payload[:8], self.echo)
        with self._lock:
            self.count += 1
            if self.count == self.target:
                say(f"GOT {self.count}")


async def run(node: Any, peer: str, n: int, size: int) -> tuple[float, float]:
    body = b"x" * max(0, size - 8)
    start = time.perf_counter()
    handles = await asyncio.gather(*(node.asend(peer, i.to_bytes(8, "big") + body) for i in range(n)))
    accepted = time.perf_counter() - start
    for status in await asyncio.wait_for(asyncio.gather(*handles), WAIT):
        if not status.delivered:
            raise RuntimeError(f"message not delivered: {status}")
    return accepted, time.perf_counter() - start


async def run_many(node: Any, peer: str, n: int, size: int) -> tuple[float, float]:
    body = b"x" * max(0, size - 8)
    start = time.perf_counter()
    handles = node.send_many([(peer, i.to_bytes(8, "big") + body) for i in range(n)])
    accepted = time.perf_counter() - start
    for status in await asyncio.wait_for(ended(handles), WAIT):
        if not status.delivered:
            raise RuntimeError(f"message not delivered: {status}")
    return accepted, time.perf_counter() - start


def latency(node: Any, peer: str, n: int, size: int, port: int) -> list[float]:
    body = b"x" * max(0, size - 8)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))
    udp.settimeout(WAIT)
    samples = []
    try:
        for i in range(n):
            tag = i.to_bytes(8, "big")
            start = time.perf_counter()
            handle = node.send(peer, tag + body)
            while udp.recv(64) != tag:
                pass  # an echo of an earlier message (none is expected)
            handle.result(WAIT)
            samples.append((time.perf_counter() - start) * 1000)
    finally:
        udp.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--synchronous", default="NORMAL")
    args = parser.parse_args()
    durability = {"synchronous": args.synchronous} if args.synchronous != "NORMAL" else {}
    node = create_network(
        "hybrid",
        name=args.name,
        data_dir=args.data_dir,
        port=args.port,
        host="127.0.0.1",
        bootstrap=(args.bootstrap,),
        discovery_interval=1.0,
        discovery_timeout=1.0,
        **durability,
    )
    handler = Handler()
    node.subscribe("*", handler)
    node.start()
    if os.environ.get("VM_BENCH_GC_FREEZE", "1") == "1":
        gc.freeze()  # the start-up heap leaves the collector's passes (see delivery.py's docstring)
    say(f"READY {node.node_id}")
    peer = ""
    try:
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            command, rest = words[0], words[1:]
            if command == "wait_peer":
                peer = rest[0]
                deadline = time.monotonic() + 30
                while peer not in {p.peer_id for p in node.peers()}:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"peer {peer} not found within 30 s")
                    time.sleep(0.05)
                say("PEER")
            elif command == "expect":
                with handler._lock:
                    handler.count, handler.target = 0, int(rest[0])
                say("EXPECTING")
            elif command == "echo":
                handler.echo = ("127.0.0.1", int(rest[0]))
                say("ECHOING")
            elif command == "run":
                accepted, delivered = asyncio.run(run(node, peer, int(rest[0]), int(rest[1])))
                say(f"RAN {accepted} {delivered}")
            elif command == "run_many":
                accepted, delivered = asyncio.run(run_many(node, peer, int(rest[0]), int(rest[1])))
                say(f"RAN {accepted} {delivered}")
            elif command == "latency":
                samples = latency(node, peer, int(rest[0]), int(rest[1]), int(rest[2]))
                say("LAT " + " ".join(f"{s:.4f}" for s in samples))
            elif command == "stats":
                usage = resource.getrusage(resource.RUSAGE_SELF)
                say(f"STATS {usage.ru_utime + usage.ru_stime} {usage.ru_nvcsw} {usage.ru_nivcsw}")
            elif command == "quit":
                break
            else:
                raise RuntimeError(f"unknown command {line!r}")
    finally:
        node.stop()


if __name__ == "__main__":
    main()
