"""Reliable messages per second node to node, beside a raw TCP echo and NATS JetStream measured in the same run.

    python benchmarks/delivery.py [--messages N] [--sizes 64 1024 16384] [--rounds R] [--latency-samples M]
                                  [--no-jetstream]

villagemesh, three ways, each with two nodes on 127.0.0.1 that know each other:

* **processes** (the real deployment): each node in its own process
  (``benchmarks/_delivery_node.py``). The sender's one thread awaits
  ``asyncio.gather`` over ``N`` ``Node.asend`` calls (those of one loop turn
  reach the retrier together and share a commit; each returns once stored),
  then ``asyncio.gather`` over every handle; the clock
  stops when every handle ended delivered (the recipient's outcome report came
  back) *and* the receiver's handler has seen all ``N``.
  So a message counts once it was stored in B's outbox, carried over the
  secure WebSocket, deduplicated and committed in A's inbox, handed to the
  handler (its dispatch committed), and acknowledged back to B. Once with
  ``synchronous=NORMAL`` (the default: survives a killed process) and once with
  ``FULL`` (an fsync per commit: survives power loss).
* **processes, send_many**: the same two processes, the ``N`` messages sent with one
  ``Node.send_many`` (it returns once all are stored: one ask and one commit per 256),
  their handles awaited with ``villagemesh.aio.ended`` (one future for all).
* **one process**: both nodes in this process (one GIL for both), sent the same way.
* **one at a time** (processes): send one message, wait until the receiver's
  handler ran (it echoes the message's tag over UDP) and its handle ended
  delivered (the ack); ``--latency-samples`` times: p50 and p99.

Baselines, same run, same sizes, alternated with the above so machine noise hits all alike:

* **raw TCP echo**: an asyncio echo on its own thread and loop, one client that
  pipelines ``N`` length-prefixed frames and reads the ``N`` echoes. No storage,
  no encoding, no retries: the ceiling of any scheme on one TCP connection.
* **NATS JetStream**, the durable-broker anchor: ``nats-server -js`` with file
  storage on a free loopback port (Debian's ``nats-server``, started and stopped
  here; skipped with a note when it is not installed), driven with nats-py from
  this process: a push consumer with explicit acks, then the ``N`` messages
  published with acks, both as gathered ``publish`` calls and as
  ``publish_async``; the faster counts. End to end: every publish acked and every
  message consumed and acked.

Every Python process here (the two node processes, this one) calls
``gc.freeze()`` once set up, as a long-running node process should: the
start-up heap (modules, aiohttp, the actors) then stays out of the cyclic
collector's passes, which otherwise cost a third of the sender's time at full
rate (``--no-gc-freeze`` shows it).

Keys of the JSON line (per size): ``msgs_per_s_processes`` (and ``_full``),
``jetstream_msgs_per_s``, ``jetstream_ratio`` (processes / JetStream),
``latency_p50_ms``, ``latency_p99_ms``, ``cpu_us_per_msg`` (processes: both node
processes' CPU time per message), ``ctx_switches_per_msg`` (voluntary context
switches of both node processes per message), the same three for ``send_many``
(``msgs_per_s_processes_send_many``, ``cpu_us_per_msg_send_many``,
``ctx_switches_per_msg_send_many``); and, as before, ``msgs_per_s``
(one process), ``raw_tcp_msgs_per_s``, ``ratio`` (one process / raw TCP),
``send_calls_per_s`` (how fast the gathered ``asend`` calls all returned, i.e.
were handed to the retrier, one process), ``cpu_us_per_msg_one_process`` and
``raw_tcp_cpu_us_per_msg``; and ``cpu_us_per_msg_by_thread_send_many``: where the
``send_many`` CPU goes, µs a message per thread of the two node processes
(``/proc/<pid>/task/*/schedstat``; named ``sender`` or ``receiver`` and the thread's OS name without
its instance number, e.g. ``sender Retrier``, ``receiver Libp2p:loop``, ``sender python`` for the
sending thread; threads under 1 µs left out), the figure that says which actor to make cheaper.
Each figure is the median of ``--rounds``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, percentile
from discovery import free_port

from villagemesh import create_network

NODE_SCRIPT = Path(__file__).resolve().parent / "_delivery_node.py"

NO_GC_FREEZE = "--no-gc-freeze" in sys.argv
"""Read before the node processes start (they take it from their environment)."""

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

    def run(self, n: int, size: int) -> tuple[float, float, float]:
        """(messages/s end to end, messages stored/s, CPU µs per message) for ``n`` messages of ``size`` bytes,
        gathered ``asend`` calls from this one thread."""
        body = b"x" * max(0, size - 8)
        self.inbox.expect(n)

        async def send() -> tuple[float, list[Any]]:
            peer = self.a.node_id
            handles = await asyncio.gather(*(self.b.asend(peer, i.to_bytes(8, "big") + body) for i in range(n)))
            return time.perf_counter() - start, handles

        cpu = time.process_time()
        start = time.perf_counter()
        accepted, handles = asyncio.run(send())
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


class Child:
    """One node process speaking ``_delivery_node.py``'s line protocol."""

    def __init__(self, root: Path, name: str, port: int, peer_port: int, synchronous: str) -> None:
        args = [sys.executable, str(NODE_SCRIPT), "--data-dir", str(root / name), "--name", name]
        args += ["--port", str(port), "--bootstrap", f"127.0.0.1:{peer_port}", "--synchronous", synchronous]
        env = {**os.environ, "VM_BENCH_GC_FREEZE": "0" if NO_GC_FREEZE else "1"}
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        self.node_id = self.expect("READY").split()[1]

    def expect(self, word: str) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith(word):
            raise RuntimeError(f"node process said {line!r}, expected {word} (exit code {self.proc.poll()})")
        return line.strip()

    def command(self, line: str, answer: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.expect(answer)

    def stats(self) -> tuple[float, int]:
        """(CPU seconds, voluntary context switches) of the process so far."""
        _, cpu, voluntary, _ = self.command("stats", "STATS").split()
        return float(cpu), int(voluntary)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of process ``pid`` (``/proc/.../schedstat``: nanoseconds, where
    ``stat`` counts 10 ms ticks), by its name without a trailing ``-<n>`` (threads of one name summed)."""
    seconds: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        task = Path(f"/proc/{pid}/task/{tid}")
        try:
            name = (task / "comm").read_text().strip()
            on_cpu_ns = int((task / "schedstat").read_text().split()[0])
        except FileNotFoundError:
            continue  # the thread ended between the listing and the read
        base, _, number = name.rpartition("-")
        if base and number.isdigit():
            name = base
        seconds[name] = seconds.get(name, 0.0) + on_cpu_ns / 1e9
    return seconds


class ProcessPair:
    """Two node processes that know each other; B sends to A."""

    def __init__(self, root: Path, synchronous: str = "NORMAL") -> None:
        port_a, port_b = free_port(), free_port()
        self.a = Child(root, "a", port_a, port_b, synchronous)
        self.b = Child(root, "b", port_b, port_a, synchronous)
        self.b.command(f"wait_peer {self.a.node_id}", "PEER")
        self.a.command(f"wait_peer {self.b.node_id}", "PEER")
        self.threads: dict[str, float] = {}
        """µs of CPU a message per thread in the last :meth:`run` (``sender X`` / ``receiver X``)."""
        self.run(100, 64)  # warm-up: connections open, code paths hot

    def run(self, n: int, size: int, way: str = "run") -> tuple[float, float, float]:
        """(messages/s end to end, CPU µs per message, voluntary context switches per message), both processes;
        ``way`` ``run`` (gathered ``asend``) or ``run_many`` (one ``send_many``)."""
        self.a.command(f"expect {n}", "EXPECTING")
        (cpu_a, sw_a), (cpu_b, sw_b) = self.a.stats(), self.b.stats()
        threads = {role: thread_cpu(c.proc.pid) for role, c in (("receiver", self.a), ("sender", self.b))}
        start = time.perf_counter()
        self.b.command(f"{way} {n} {size}", "RAN")
        self.a.expect("GOT")
        elapsed = time.perf_counter() - start
        (cpu_a2, sw_a2), (cpu_b2, sw_b2) = self.a.stats(), self.b.stats()
        self.threads = {}
        for role, child in (("receiver", self.a), ("sender", self.b)):
            for name, seconds in thread_cpu(child.proc.pid).items():
                self.threads[f"{role} {name}"] = (seconds - threads[role].get(name, 0.0)) / n * 1e6
        cpu = (cpu_a2 - cpu_a + cpu_b2 - cpu_b) / n * 1e6
        return n / elapsed, cpu, (sw_a2 - sw_a + sw_b2 - sw_b) / n

    def latency(self, n: int, size: int) -> list[float]:
        """Milliseconds from ``send`` to both the receiver's handler and the ack, one message at a time."""
        port = free_port(socket.SOCK_DGRAM)
        self.a.command(f"echo {port}", "ECHOING")
        samples = self.b.command(f"latency {n} {size} {port}", "LAT").split()[1:]
        return [float(x) for x in samples]

    def close(self) -> None:
        self.b.close()
        self.a.close()


class JetStream:
    """``nats-server -js`` with file storage on a free loopback port, in a temporary directory."""

    def __init__(self, root: Path) -> None:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        self.port = free_port()
        store = root / "jetstream"
        store.mkdir()
        args = [binary, "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("nats-server did not start listening within 10 s") from None
                time.sleep(0.05)

    def cpu_s(self) -> float:
        """The server process's CPU seconds so far (from /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def run(self, n: int, size: int) -> tuple[float, float]:
        """(messages/s end to end, CPU µs per message: this process and the server), the faster publish way."""
        best, best_cpu = 0.0, 0.0
        for way in ("gather", "async"):
            cpu, server = time.process_time(), self.cpu_s()
            rate = asyncio.run(self._run(n, size, way))
            used = (time.process_time() - cpu + self.cpu_s() - server) / n * 1e6
            if rate > best:
                best, best_cpu = rate, used
        return best, best_cpu

    async def _run(self, n: int, size: int, way: str) -> float:
        import nats

        nc = await nats.connect(f"nats://127.0.0.1:{self.port}")
        js = nc.jetstream()
        name = f"bench{uuid.uuid4().hex[:8]}"
        await js.add_stream(name=name, subjects=[name], storage="file")
        body = b"x" * max(0, size - 8)
        got = 0
        done = asyncio.Event()

        async def consumed(msg: Any) -> None:
            nonlocal got
            await msg.ack()
            got += 1
            if got == n:
                done.set()

        await js.subscribe(name, durable=name, manual_ack=True, cb=consumed, pending_msgs_limit=n + 1)
        start = time.perf_counter()
        if way == "gather":
            await asyncio.gather(*(js.publish(name, i.to_bytes(8, "big") + body) for i in range(n)))
        else:
            futures = [await js.publish_async(name, i.to_bytes(8, "big") + body) for i in range(n)]
            await asyncio.gather(*futures)
        await asyncio.wait_for(done.wait(), WAIT)
        elapsed = time.perf_counter() - start
        await js.delete_stream(name)
        await nc.close()
        return n / elapsed

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


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


def thread_medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each thread's median µs a message over ``rounds`` (0 in a round it did not run), busiest first,
    those under 1 µs left out."""
    names = {name for figures in rounds for name in figures}
    medians = {name: statistics.median(r.get(name, 0.0) for r in rounds) for name in names}
    return {name: round(us, 1) for name, us in sorted(medians.items(), key=lambda kv: -kv[1]) if us >= 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 1024, 16384])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--no-jetstream", action="store_true", help="skip the NATS JetStream anchor")
    parser.add_argument(
        "--no-gc-freeze", action="store_true", help="leave the start-up heap in every collection (all processes)"
    )
    args = parser.parse_args()
    sizes, n = args.sizes, args.messages
    figures: dict[str, dict[int, list[float]]] = {}

    def record(key: str, size: int, value: float) -> None:
        figures.setdefault(key, {s: [] for s in sizes})[size].append(value)

    by_thread: dict[int, list[dict[str, float]]] = {}

    jetstream_note = None
    if not args.no_jetstream and shutil.which("nats-server") is None and not Path("/usr/sbin/nats-server").exists():
        jetstream_note = "nats-server not installed (make benchsysdeps): JetStream skipped"
        args.no_jetstream = True
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    echo = EchoServer()
    with tempfile.TemporaryDirectory(prefix="vm-delivery-") as tmp:
        root = Path(tmp)
        pair = Pair(root / "one")
        procs = ProcessPair(root / "normal")
        full = ProcessPair(root / "full", synchronous="FULL")
        jetstream = None if args.no_jetstream else JetStream(root)
        if not args.no_gc_freeze:
            gc.freeze()  # as the node processes do: the start-up heap leaves the collector's passes
        try:
            for _ in range(args.rounds):
                for size in sizes:
                    rate, cpu = raw_tcp(echo, n, size)
                    record("raw", size, rate)
                    record("raw_cpu", size, cpu)
                    rate, cpu, switches = procs.run(n, size)
                    record("processes", size, rate)
                    record("processes_cpu", size, cpu)
                    record("switches", size, switches)
                    rate, cpu, switches = procs.run(n, size, "run_many")
                    by_thread.setdefault(size, []).append(procs.threads)
                    record("processes_many", size, rate)
                    record("processes_many_cpu", size, cpu)
                    record("switches_many", size, switches)
                    record("processes_full", size, full.run(n, size)[0])
                    rate, accepted, cpu = pair.run(n, size)
                    record("one", size, rate)
                    record("accepted", size, accepted)
                    record("one_cpu", size, cpu)
                    if jetstream is not None:
                        rate, cpu = jetstream.run(n, size)
                        record("jetstream", size, rate)
                        record("jetstream_cpu", size, cpu)
            for size in sizes:
                samples = procs.latency(args.latency_samples, size)
                record("p50", size, percentile(samples, 50))
                record("p99", size, percentile(samples, 99))
        finally:
            if jetstream is not None:
                jetstream.close()
            full.close()
            procs.close()
            pair.close()
            echo.close()
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    med = {key: {s: statistics.median(v) for s, v in per.items()} for key, per in figures.items()}
    js = med.get("jetstream", {})
    print(f"load average before {' '.join(load_before)}, after {' '.join(load_after)}")
    print(
        f"{'payload':>8}  {'processes/s':>11}  {'FULL/s':>8}  {'one proc/s':>10}  {'JetStream/s':>11}  {'vs JS':>6}"
        f"  {'raw TCP/s':>9}  {'CPU µs':>7}  {'ctx sw':>6}  {'p50 ms':>6}  {'p99 ms':>6}"
        f"  {'send_many/s':>11}  {'CPU µs':>7}  {'ctx sw':>6}"
    )
    for s in sizes:
        jet = js.get(s)
        jet_rate = f"{jet:,.0f}" if jet else "-"
        versus = f"{med['processes'][s] / jet:.2f}" if jet else "-"
        print(
            f"{s:>7}B  {med['processes'][s]:>11,.0f}  {med['processes_full'][s]:>8,.0f}  {med['one'][s]:>10,.0f}"
            f"  {jet_rate:>11}  {versus:>6}"
            f"  {med['raw'][s]:>9,.0f}  {med['processes_cpu'][s]:>7,.0f}  {med['switches'][s]:>6.2f}"
            f"  {med['p50'][s]:>6.2f}  {med['p99'][s]:>6.2f}"
            f"  {med['processes_many'][s]:>11,.0f}  {med['processes_many_cpu'][s]:>7,.0f}"
            f"  {med['switches_many'][s]:>6.2f}"
        )
    if jetstream_note:
        print(jetstream_note)
    threads = {str(s): thread_medians(rounds) for s, rounds in by_thread.items()}
    for s, per in threads.items():
        shares = ", ".join(f"{name} {us:.1f}" for name, us in per.items())
        print(f"send_many {s} B, CPU µs a message by thread: {shares}")

    def per_size(key: str, digits: int = 0) -> dict[str, float]:
        return {str(s): (round(v, digits) if digits else round(v)) for s, v in med[key].items()}

    emit(
        "delivery",
        messages=n,
        rounds=args.rounds,
        senders=1,
        sizes=sizes,
        load_average_before=load_before,
        load_average_after=load_after,
        msgs_per_s={str(s): round(med["one"][s]) for s in sizes},
        raw_tcp_msgs_per_s=per_size("raw"),
        ratio={str(s): round(med["one"][s] / med["raw"][s], 4) for s in sizes},
        send_calls_per_s=per_size("accepted"),
        cpu_us_per_msg=per_size("processes_cpu"),
        cpu_us_per_msg_one_process=per_size("one_cpu"),
        raw_tcp_cpu_us_per_msg=per_size("raw_cpu", 1),
        msgs_per_s_processes=per_size("processes"),
        msgs_per_s_processes_full=per_size("processes_full"),
        jetstream_msgs_per_s={str(s): round(v) for s, v in js.items()} or None,
        jetstream_cpu_us_per_msg={str(s): round(v) for s, v in med.get("jetstream_cpu", {}).items()} or None,
        jetstream_ratio={str(s): round(med["processes"][s] / js[s], 3) for s in js} or None,
        latency_p50_ms=per_size("p50", 3),
        latency_p99_ms=per_size("p99", 3),
        ctx_switches_per_msg=per_size("switches", 3),
        msgs_per_s_processes_send_many=per_size("processes_many"),
        cpu_us_per_msg_send_many=per_size("processes_many_cpu"),
        ctx_switches_per_msg_send_many=per_size("switches_many", 3),
        cpu_us_per_msg_by_thread_send_many=threads,
        jetstream_note=jetstream_note,
    )


if __name__ == "__main__":
    main()
