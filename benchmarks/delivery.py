"""Reliable messages per second node to node, beside a raw TCP echo baseline measured in the same run.

    python benchmarks/delivery.py [--messages N] [--sizes 64 1024 16384] [--rounds R]

villagemesh: two nodes on 127.0.0.1 in this process, each seeded with the
other's address. After a warm-up message, node B sends ``N`` messages of a
given payload size to node A with ``Node.send`` as fast as the API accepts
them; the clock stops when every delivery handle has ended *and* A's
subscriber has seen all ``N``. So a message counts once it was stored in B's
outbox, carried over a WebSocket, deduplicated and committed in A's inbox,
handed to the application, and acknowledged back to B (the handle resolves on
the end-to-end ack).

Baseline: a raw asyncio TCP echo on loopback (server on its own thread and
loop, like the other node), one client that pipelines ``N`` length-prefixed
frames of the same size (4-byte big-endian length + payload) and reads the
``N`` echoes: the echo plays the acknowledgement. No storage, no encoding, no
retries: the ceiling any reliable scheme on one TCP connection pays against.

``send_calls_per_s`` is how fast ``Node.send`` alone returned (it waits for the
outbox commit): when it is close to ``msgs_per_s`` the sending API, not the
network path, is the limit; ``--senders K`` calls it from K threads at once.

``ratio`` = villagemesh / raw TCP per size (higher is better; 1.0 would be free
reliability). Each figure is the median of ``--rounds``, the two measured
alternately so machine noise hits both alike.

``cpu_us_per_msg`` is the process's CPU time (every thread, both nodes; for the
baseline, client and echo) per message. Both nodes share one interpreter, so
their Python work is serialised by one GIL: CPU per message is what bounds the
rate, and it moves less with other load on the machine than the rate does.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit
from discovery import free_port

from villagemesh import create_network

WAIT = 300.0
"""Seconds a run may take before the benchmark gives up (only a hang reaches it)."""

_LEN = struct.Struct(">I")


class Counting:
    """A subscriber that sets an event at the ``target``-th message."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.done = threading.Event()
        self._lock = threading.Lock()

    def expect(self, target: int) -> None:
        with self._lock:
            self.count, self.target = 0, target
            self.done.clear()

    def __call__(self, message: Any) -> None:
        with self._lock:
            self.count += 1
            if self.count >= self.target:
                self.done.set()


class Pair:
    """Two started nodes that know each other; B sends to A."""

    def __init__(self, root: Path) -> None:
        port_a, port_b = free_port(), free_port()
        settings: dict[str, Any] = {"host": "127.0.0.1", "discovery_interval": 1.0, "discovery_timeout": 1.0}
        self.a = create_network(
            "hybrid", name="a", data_dir=root / "a", port=port_a, bootstrap=(f"127.0.0.1:{port_b}",), **settings
        )
        self.b = create_network(
            "hybrid", name="b", data_dir=root / "b", port=port_b, bootstrap=(f"127.0.0.1:{port_a}",), **settings
        )
        self.inbox = Counting()
        self.a.subscribe("*", self.inbox)
        self.a.start()
        self.b.start()
        if not (self.a.wait_for_peers(1, 30) and self.b.wait_for_peers(1, 30)):
            raise RuntimeError("the two nodes did not find each other within 30 s")
        self.inbox.expect(1)
        self.b.send(self.a.node_id, b"warm-up").result(30)

    def run(self, n: int, size: int, senders: int) -> tuple[float, float, float]:
        """(messages/s end to end, ``send`` calls/s, CPU µs per message) for ``n`` messages of ``size`` bytes
        from ``senders`` threads."""
        body = b"x" * max(0, size - 8)
        self.inbox.expect(n)
        handles: list[Any] = []

        def send(first: int) -> None:
            mine = [self.b.send(self.a.node_id, i.to_bytes(8, "big") + body) for i in range(first, n, senders)]
            handles.extend(mine)

        threads = [threading.Thread(target=send, args=(k,)) for k in range(senders)]
        cpu = time.process_time()
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        accepted = time.perf_counter() - start
        deadline = time.monotonic() + WAIT
        for handle in handles:
            status = handle.result(max(0.0, deadline - time.monotonic()))
            if not status.delivered:
                raise RuntimeError(f"message not delivered: {status}")
        if not self.inbox.done.wait(max(0.0, deadline - time.monotonic())):
            raise RuntimeError(f"receiver saw {self.inbox.count} of {n}")
        return n / (time.perf_counter() - start), n / accepted, (time.process_time() - cpu) / n * 1e6

    def close(self) -> None:
        self.b.stop()
        self.a.stop()


class EchoServer:
    """Length-prefixed echo on its own thread and event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(4)
                body = await reader.readexactly(_LEN.unpack(header)[0])
                writer.write(header + body)
                if writer.transport.get_write_buffer_size() > 1 << 20:
                    await writer.drain()
        except asyncio.IncompleteReadError:
            pass  # the client is done
        writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _echo_client(port: int, n: int, size: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b"x" * max(0, size - 8)

    async def read_all() -> None:
        for _ in range(n):
            header = await reader.readexactly(4)
            await reader.readexactly(_LEN.unpack(header)[0])

    start = time.perf_counter()
    reading = asyncio.ensure_future(read_all())
    for i in range(n):
        payload = i.to_bytes(8, "big") + body
        writer.write(_LEN.pack(len(payload)) + payload)
        if writer.transport.get_write_buffer_size() > 1 << 20:
            await writer.drain()
    await writer.drain()
    await asyncio.wait_for(reading, WAIT)
    elapsed = time.perf_counter() - start
    writer.close()
    await writer.wait_closed()
    return n / elapsed


def raw_tcp(server: EchoServer, n: int, size: int) -> tuple[float, float]:
    """(messages/s, CPU µs per message) through the echo: ``n`` pipelined frames of ``size`` bytes and their echoes."""
    cpu = time.process_time()
    rate = asyncio.run(_echo_client(server.port, n, size))
    return rate, (time.process_time() - cpu) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 1024, 16384])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--senders", type=int, default=1, help="threads calling Node.send concurrently")
    args = parser.parse_args()
    vm: dict[int, list[float]] = {s: [] for s in args.sizes}
    calls: dict[int, list[float]] = {s: [] for s in args.sizes}
    raw: dict[int, list[float]] = {s: [] for s in args.sizes}
    vm_cpu: dict[int, list[float]] = {s: [] for s in args.sizes}
    raw_cpu: dict[int, list[float]] = {s: [] for s in args.sizes}
    echo = EchoServer()
    with tempfile.TemporaryDirectory(prefix="vm-delivery-") as root:
        pair = Pair(Path(root))
        try:
            for _ in range(args.rounds):
                for size in args.sizes:
                    rate, cpu = raw_tcp(echo, args.messages, size)
                    raw[size].append(rate)
                    raw_cpu[size].append(cpu)
                    end_to_end, accepted, cpu = pair.run(args.messages, size, args.senders)
                    vm[size].append(end_to_end)
                    calls[size].append(accepted)
                    vm_cpu[size].append(cpu)
        finally:
            pair.close()
            echo.close()
    msgs = {s: round(statistics.median(v)) for s, v in vm.items()}
    base = {s: round(statistics.median(v)) for s, v in raw.items()}
    accept = {s: round(statistics.median(v)) for s, v in calls.items()}
    ratio = {s: round(msgs[s] / base[s], 4) for s in args.sizes}
    cpu_vm = {s: round(statistics.median(v)) for s, v in vm_cpu.items()}
    cpu_raw = {s: round(statistics.median(v), 1) for s, v in raw_cpu.items()}
    print(
        f"{'payload':>8}  {'villagemesh msgs/s':>18}  {'Node.send calls/s':>17}  {'raw TCP echo msgs/s':>19}  ratio"
        f"  {'CPU µs/msg':>10}  {'raw CPU µs/msg':>14}"
    )
    for s in args.sizes:
        print(
            f"{s:>7}B  {msgs[s]:>18,}  {accept[s]:>17,}  {base[s]:>19,}  {ratio[s]:.4f}"
            f"  {cpu_vm[s]:>10,}  {cpu_raw[s]:>14}"
        )
    emit(
        "delivery",
        messages=args.messages,
        rounds=args.rounds,
        senders=args.senders,
        sizes=args.sizes,
        msgs_per_s={str(s): msgs[s] for s in args.sizes},
        raw_tcp_msgs_per_s={str(s): base[s] for s in args.sizes},
        ratio={str(s): ratio[s] for s in args.sizes},
        send_calls_per_s={str(s): accept[s] for s in args.sizes},
        cpu_us_per_msg={str(s): cpu_vm[s] for s in args.sizes},
        raw_tcp_cpu_us_per_msg={str(s): cpu_raw[s] for s in args.sizes},
    )


if __name__ == "__main__":
    main()
