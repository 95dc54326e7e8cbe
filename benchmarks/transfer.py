"""MiB/s of a large file node -> node, beside raw TCP ``sendfile``, the secure channel's ceiling and the floor.

Figures from the same run, on the same file:

- ``mib_per_s``: ``Node.send_file`` (hash, offer, chunks through both retriers and the libp2p
  transport's Noise session, receiver's pwrite + commit + ack, whole-file verification, move into
  place) from the call until the handle ends verified. The receiver is a node in a child process (so that each
  side's memory is its own).
- ``raw_mib_per_s``: ``socket.sendfile`` of the same file over loopback TCP to a thread writing it
  to a file (no framing, no crypto, no durability). ``raw_ratio`` = mib_per_s / raw_mib_per_s.
- ``secure_mib_per_s``: the secure channel's own ceiling, ``SecureChannel`` send + receive of 64 KiB
  frames on as many bytes, in memory (:mod:`secure_channel`'s round trip). ``secure_ratio`` =
  mib_per_s / secure_mib_per_s; ``target`` 0.5 (from the issue).
  Both baselines run before and after the node's run; their mean is reported (load drifts).
- ``floor_mib_per_s`` and ``floor_hop_mib_per_s``: the floor under any design (:mod:`_transfer_floor`):
  the steps the issue requires (the whole SHA-256 first, per chunk pread, CRC-32, the project's
  ``SecureChannel`` over loopback TCP, the CRC check, the digest, pwrite; fsync, rename, the digest
  checked) and nothing else, two processes, one thread each; and the same with the socket and the
  file in two threads per process, each chunk handed between them once (the least an actor design
  allows). ``floor_ratio`` and ``floor_hop_ratio``: each / ``secure_mib_per_s``, to read beside
  ``target``; ``floor_hop_share``: mib_per_s / floor_hop_mib_per_s. Each runs once before and once
  after the node's run; their mean is reported. ``--no-floor`` leaves them out.
- ``peak_rss_mib``: the larger peak RSS growth of the two nodes while the file moves (Linux
  ``VmHWM`` reset through ``/proc/self/clear_refs`` once the node is up, minus ``VmRSS`` then);
  ``sender_peak_rss_mib``, ``receiver_peak_rss_mib`` each; target 64.
- ``seconds`` of the node's run, and ``sender_cpu_s``, ``receiver_cpu_s``: CPU time (all threads) each
  process spent meanwhile: where the time goes (two cores: CPU-bound when the two add up to 2 x seconds).

    .venv/bin/python benchmarks/transfer.py [--quick] [--megabytes 256] [--window N] [--chunk-size BYTES]
        [--switch-interval SECONDS] [--no-floor]

``--megabytes 1024`` is the issue's memory figure (1 GiB). The JSON line also names the window, the
chunk size and the switch interval the run used.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import emit
from _transfer_floor import floor
from secure_channel import MAX_PLAINTEXT, channel_roundtrip

from villagemesh.actors.transfer.state import DEFAULT_CHUNK_BYTES, DEFAULT_WINDOW

TARGET = 0.5
RSS_TARGET_MIB = 64


def status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory figure (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> float:
    """Reset the peak RSS to the current RSS; the current RSS in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_mib("VmRSS")


def make_file(path: Path, megabytes: int) -> None:
    with path.open("wb") as out:
        for _ in range(megabytes):
            out.write(os.urandom(1 << 20))


def receiver(data_dir: Path) -> None:
    """The child: a node that prints LISTEN, then RECEIVED and its peak RSS growth per file."""
    from villagemesh import create_network

    node = create_network("hybrid", name="receiver", data_dir=data_dir, lan=False, discovery_interval=0.3)
    done = threading.Event()
    node.on_transfer(lambda received: (print(f"RECEIVED {received.path}", flush=True), done.set()))
    with node:
        base = reset_peak()
        cpu = time.process_time()
        print(f"LISTEN {node.node_id} {node.acceptor_address}", flush=True)
        done.wait()
        print(f"PEAK {status_mib('VmHWM') - base:.1f} {time.process_time() - cpu:.2f}", flush=True)
        sys.stdin.read()  # until the parent closes it


def node_to_node(path: Path, work: Path, settings: dict[str, int]) -> tuple[float, float, float, float, float]:
    """(MiB/s, sender peak RSS growth, receiver's, sender CPU seconds, receiver's) of one send_file to a
    node in a child process (the receiver's CPU from its start listening, so a little more than the file's)."""
    from villagemesh import create_network

    switch = ["--switch-interval", str(sys.getswitchinterval())]
    child = subprocess.Popen(
        [sys.executable, __file__, "--receiver", str(work / "receiver"), *switch],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    try:
        _, peer_id, address = child.stdout.readline().split()
        node = create_network(
            "hybrid",
            name="sender",
            data_dir=work / "sender",
            lan=False,
            discovery_interval=0.3,
            bootstrap=(address,),
            **settings,
        )
        with node:
            if not node.wait_for_peers(1, 30):
                raise RuntimeError("the receiver was not found")
            base = reset_peak()
            start, cpu = time.perf_counter(), time.process_time()
            node.send_file(peer_id, path).wait(600)
            received = child.stdout.readline()
            elapsed = time.perf_counter() - start
            sender_cpu = time.process_time() - cpu
            sender_peak = status_mib("VmHWM") - base
        assert received.startswith("RECEIVED"), received
        _, receiver_peak, receiver_cpu = child.stdout.readline().split()
    finally:
        child.stdin.close()
        child.wait(60)
    rate = path.stat().st_size / (1 << 20) / elapsed
    return rate, sender_peak, float(receiver_peak), sender_cpu, float(receiver_cpu)


def raw_tcp(path: Path, work: Path) -> float:
    """MiB/s of ``socket.sendfile`` over loopback to a thread that writes the bytes to a file."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    got = [0]

    def sink() -> None:
        conn, _ = server.accept()
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        with conn, (work / "raw.out").open("wb") as out:
            while n := conn.recv_into(buffer):
                out.write(view[:n])
                got[0] += n

    thread = threading.Thread(target=sink)
    thread.start()
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as client, path.open("rb") as source:
        client.sendfile(source)
    thread.join()
    elapsed = time.perf_counter() - start
    server.close()
    assert got[0] == path.stat().st_size
    return got[0] / (1 << 20) / elapsed


def secure_ceiling(megabytes: int) -> float:
    count = max(1, megabytes * (1 << 20) // MAX_PLAINTEXT)
    pool = [bytes([n]) * MAX_PLAINTEXT for n in range(16)]
    chunks = [pool[n % len(pool)] for n in range(count)]
    return count * MAX_PLAINTEXT / (1 << 20) / channel_roundtrip(chunks)


def floors(path: Path, work: Path) -> tuple[float, float]:
    """(floor MiB/s, floor-with-hops MiB/s), one run of each."""
    return floor(path, work / "floor.out", hops=False), floor(path, work / "floor.out", hops=True)


def main(megabytes: int, settings: dict[str, int], with_floor: bool = True) -> None:
    with tempfile.TemporaryDirectory(prefix="villagemesh-transfer-") as tmp:
        work = Path(tmp)
        path = work / "weights.bin"
        make_file(path, megabytes)
        # The baselines before and after the node's run (their mean): a shared machine's load
        # drifts, and both sides of each ratio should see the same drift.
        raw_before, secure_before = raw_tcp(path, work), secure_ceiling(megabytes)
        floor_before = floors(path, work) if with_floor else (0.0, 0.0)
        rate, sender_peak, receiver_peak, sender_cpu, receiver_cpu = node_to_node(path, work, settings)
        raw = (raw_before + raw_tcp(path, work)) / 2
        secure = (secure_before + secure_ceiling(megabytes)) / 2
        floor_after = floors(path, work) if with_floor else (0.0, 0.0)
    peak = max(sender_peak, receiver_peak)
    floor_figures: dict[str, float] = {}
    if with_floor:
        bare, hop = ((before + after) / 2 for before, after in zip(floor_before, floor_after, strict=True))
        floor_figures = {
            "floor_mib_per_s": round(bare, 1),
            "floor_ratio": round(bare / secure, 3),
            "floor_hop_mib_per_s": round(hop, 1),
            "floor_hop_ratio": round(hop / secure, 3),
            "floor_hop_share": round(rate / hop, 3),
        }
    emit(
        "transfer",
        mib_per_s=round(rate, 1),
        raw_mib_per_s=round(raw, 1),
        raw_ratio=round(rate / raw, 3),
        secure_mib_per_s=round(secure, 1),
        secure_ratio=round(rate / secure, 3),
        target=TARGET,
        **floor_figures,
        peak_rss_mib=round(peak, 1),
        sender_peak_rss_mib=round(sender_peak, 1),
        receiver_peak_rss_mib=round(receiver_peak, 1),
        rss_target_mib=RSS_TARGET_MIB,
        seconds=round(megabytes / rate, 2),
        sender_cpu_s=round(sender_cpu, 2),
        receiver_cpu_s=round(receiver_cpu, 2),
        megabytes=megabytes,
        window=settings.get("transfer_window", DEFAULT_WINDOW),
        chunk_size=settings.get("transfer_chunk_size", DEFAULT_CHUNK_BYTES),
        switch_interval_ms=sys.getswitchinterval() * 1000,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB")
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--window", type=int, help=f"NodeConfig.transfer_window (default {DEFAULT_WINDOW})")
    parser.add_argument("--chunk-size", type=int, help="NodeConfig.transfer_chunk_size (default: the transports')")
    parser.add_argument(
        "--switch-interval", type=float, help="sys.setswitchinterval in both processes, seconds (default 0.005)"
    )
    parser.add_argument("--no-floor", action="store_true", help="leave out the floor baselines")
    parser.add_argument("--receiver", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if args.receiver is not None:
        receiver(args.receiver)
    else:
        chosen = {"transfer_window": args.window, "transfer_chunk_size": args.chunk_size}
        settings = {k: v for k, v in chosen.items() if v is not None}
        main(32 if args.quick else args.megabytes, settings, with_floor=not args.no_floor)
