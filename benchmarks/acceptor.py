"""Accepted connections per second: the sniffing acceptor vs a plain listener, same run.

Each connection: connect over loopback, send a small HTTP request prefix, get
handed to the handler (which answers ``HTTP/1.1 204`` and closes), close. The
baseline is a plain ``loop.create_server`` whose protocol *is* the handler: the
same work minus sniffing, cap accounting, the timer and the hand-off. Client
and servers share one event loop in one thread, so both figures carry the same
client cost; rounds alternate which side goes first and the median of each is
kept, so drift on a shared machine and TIME_WAIT build-up hit both alike.

Prints one JSON line: ``sniffing_conn_per_s``, ``plain_conn_per_s`` (the
baseline), ``ratio`` (= sniffing / plain), ``overhead`` (= 1 − ratio) and
``target_overhead`` (0.05, from the issue).

    .venv/bin/python benchmarks/acceptor.py [--connections 2000] [--rounds 8] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time

import structlog

from villagemesh.actors.acceptor.server import AcceptorServer
from villagemesh.actors.acceptor.state import AcceptorLimits
from villagemesh.actors.core.handoff import Route

REQUEST = b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n"
RESPONSE = b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"


class Handler(asyncio.Protocol):
    """The routed handler (and the plain listener's protocol): read the whole head, answer, close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.head = b""

    def data_received(self, data: bytes) -> None:
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.transport.write(RESPONSE)  # type: ignore[attr-defined]
            self.transport.close()


class Client(asyncio.Protocol):
    """Sends the request on connect; resolves when the server has closed."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(REQUEST)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def hammer(port: int, connections: int, concurrency: int) -> float:
    """Run ``connections`` request/close cycles, ``concurrency`` at a time; connections per second."""
    loop = asyncio.get_running_loop()
    remaining = connections

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            done: asyncio.Future[None] = loop.create_future()
            transport, _ = await loop.create_connection(lambda d=done: Client(d), "127.0.0.1", port)
            await done
            transport.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return connections / (time.perf_counter() - start)


async def main(connections: int, rounds: int, concurrency: int) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    plain = await loop.create_server(Handler, "127.0.0.1", 0, backlog=1024)
    plain_port = plain.sockets[0].getsockname()[1]
    acceptor = AcceptorServer(AcceptorLimits(max_per_source=4 * concurrency, max_total=8 * concurrency))
    acceptor.route_in_loop(Route.HTTP, Handler)
    _, sniff_port = await acceptor.start("127.0.0.1", 0)

    await hammer(plain_port, connections // 10, concurrency)  # warm-up, both paths
    await hammer(sniff_port, connections // 10, concurrency)
    plain_rates, sniff_rates = [], []
    for i in range(rounds):
        # Alternate which goes first: each round leaves thousands of TIME_WAIT sockets
        # that slow the next round's connects, and that must not always hit the same side.
        if i % 2:
            sniff_rates.append(await hammer(sniff_port, connections, concurrency))
            plain_rates.append(await hammer(plain_port, connections, concurrency))
        else:
            plain_rates.append(await hammer(plain_port, connections, concurrency))
            sniff_rates.append(await hammer(sniff_port, connections, concurrency))

    plain.close()
    await plain.wait_closed()
    await acceptor.close()
    plain_rate = statistics.median(plain_rates)
    sniff_rate = statistics.median(sniff_rates)
    ratio = sniff_rate / plain_rate
    return {
        "benchmark": "acceptor",
        "sniffing_conn_per_s": round(sniff_rate, 1),
        "plain_conn_per_s": round(plain_rate, 1),
        "ratio": round(ratio, 4),
        "overhead": round(1 - ratio, 4),
        "target_overhead": 0.05,
        "meets_target": 1 - ratio <= 0.05,
        "connections_per_round": connections,
        "rounds": rounds,
        "concurrency": concurrency,
        "routed": acceptor.statistics().get("routed.http", 0),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    # Routine events are debug-level; a benchmark measures the path, not the log sink.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING), cache_logger_on_first_use=True
    )
    print(json.dumps(asyncio.run(main(args.connections, args.rounds, args.concurrency))))
