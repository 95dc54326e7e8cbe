"""libp2p: ping round trips and one-stream throughput, ours and py-libp2p's, in the same run.

    python benchmarks/libp2p.py [--pings N] [--mib M] [--rounds R]

Four pairs, each a dialler and a listener in two processes on loopback (TCP, ``/noise``,
``/yamux/1.0.0``, then ``/ipfs/ping/1.0.0`` and one upload stream):

    ours → ours        our Libp2pHost (actors/libp2p/host.py) both sides
    ours → py-libp2p   our dialler, py-libp2p 0.8.1's listener (tests/interop/py_libp2p_peer.py)
    py-libp2p → ours   py-libp2p's dialler, our listener
    py-libp2p → py     py-libp2p both sides: the baseline

Ping: N round trips of 32 bytes on one ping stream, after one warm-up; p50 and p99.
Throughput: M MiB written on one stream to a sink that counts them and answers the count
(``/sink/1.0.0``), timed from the first write to the count; MiB/s (M = 256 by default: at
~800 MiB/s 64 MiB took 80 ms, which one preemption by another process could halve). py-libp2p lives in
``.venv-libp2p`` (``make .venv-libp2p/.installed``); its 250 ms dial artefact is patched
out (research/libp2p.md §6) and no dial is timed.

Rounds: the four pairs are measured R times in turn (ours→ours, ours→py, py→ours, py→py, then
again), and each figure is the median of its R rounds, so that a burst of other work on this
shared machine during one pair's few hundred milliseconds does not decide the ratio; every
round's figures are printed and kept in the JSON line (``rounds``).

The JSON line: ``throughput_ratio`` = ours→ours MiB/s ÷ py→py MiB/s, ``ping_ratio`` =
ours→ours ping p50 ÷ py→py ping p50 (the issue's targets: ≥ 3 and ≤ 0.3), both of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import emit, percentile

from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.libp2p.host import Libp2pHost, Libp2pStream
from villagemesh.actors.libp2p.state import Libp2pLimits, listen_multiaddr
from villagemesh.protocols.libp2p.identify import PING_PROTOCOL, check_pong

ROOT = Path(__file__).resolve().parents[1]
PY = Path(os.environ.get("VILLAGEMESH_LIBP2P_PYTHON", ROOT / ".venv-libp2p" / "bin" / "python"))
PEER = ROOT / "tests" / "interop" / "py_libp2p_peer.py"
SINK = "/sink/1.0.0"
CHUNK = 64 * 1024


def quiet(message: object, raw: bytes, node_id: str) -> None:
    """Envelopes are not measured here."""


class Silent:
    """A logger that drops every event (connection lines would interleave with the figures)."""

    def info(self, event: str, **fields: object) -> None:
        """Dropped."""

    def warning(self, event: str, **fields: object) -> None:
        """Dropped."""


async def sink(stream: Libp2pStream) -> None:
    """Count every byte until the dialler closes, then answer the count (u64)."""
    count = 0
    while chunk := await stream.read(1 << 20):
        count += len(chunk)
    await stream.write(count.to_bytes(8, "big"))


async def serve() -> None:
    """Our listener: print ``LISTEN <multiaddr>``, serve until stdin closes."""
    loop = asyncio.get_running_loop()
    holder: list[Libp2pHost] = []
    server = await loop.create_server(lambda: holder[0].protocol_factory(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limits = Libp2pLimits(send_timeout_s=60.0)
    host = Libp2pHost(
        NodeKeys.generate(), quiet, listen=listen_multiaddr("127.0.0.1", port), limits=limits, log=Silent()
    )
    holder.append(host)
    host.handlers[SINK] = sink
    print("LISTEN", host.address, flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    await host.close()
    server.close()


async def ours_dial(address: str, pings: int, size: int) -> tuple[list[float], float]:
    """Our dialler: ping round trips (seconds) and the upload's MiB/s."""
    host = Libp2pHost(NodeKeys.generate(), quiet, limits=Libp2pLimits(send_timeout_s=60.0), log=Silent())
    try:
        ping = await host.open_stream(address, PING_PROTOCOL)
        rtts = []
        for n in range(pings + 1):
            payload = os.urandom(32)
            started = time.perf_counter()
            await ping.write(payload)
            check_pong(payload, await ping.read_exactly(32))
            if n:
                rtts.append(time.perf_counter() - started)
        ping.close()
        upload = await host.open_stream(address, SINK)
        chunk, left = bytes(CHUNK), size
        started = time.perf_counter()
        while left:
            await upload.write(chunk[: min(CHUNK, left)])
            left -= min(CHUNK, left)
        upload.close()
        counted = int.from_bytes(await upload.read_exactly(8), "big")
        seconds = time.perf_counter() - started
        assert counted == size, f"the sink counted {counted} of {size} bytes"
        return rtts, size / (1 << 20) / seconds
    finally:
        await host.close()


def listener(kind: str) -> tuple[subprocess.Popen[str], str]:
    command = [str(PY), str(PEER)] if kind == "py" else [sys.executable, __file__, "--serve"]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("LISTEN "):
            return proc, line.split()[1]
    raise RuntimeError(f"{kind} listener exited ({proc.wait()}) without a LISTEN line")


def stop(proc: subprocess.Popen[str]) -> None:
    """A listener ends when its stdin closes (killed if it lingers)."""
    try:
        proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def py_dial(address: str, pings: int, size: int) -> tuple[list[float], float]:
    """py-libp2p's dialler (a process of its own): its ping round trips and upload MiB/s."""
    out = subprocess.run(
        [str(PY), str(PEER), "--dial", address, "--pings", str(pings + 1), "--sink", str(size)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout.split("\n")
    [rtts] = [line.split()[1:] for line in out if line.startswith("RTTS")]
    [sunk] = [line.split()[1:] for line in out if line.startswith("SINK")]
    assert int(sunk[0]) == size, f"py-libp2p's sink counted {sunk[0]} of {size} bytes"
    return [float(r) for r in rtts[1:]], size / (1 << 20) / float(sunk[1])


def pair(dialer: str, listener_kind: str, pings: int, size: int) -> dict[str, float]:
    proc, address = listener(listener_kind)
    try:
        if dialer == "ours":
            rtts, mib_s = asyncio.run(ours_dial(address, pings, size))
        else:
            rtts, mib_s = py_dial(address, pings, size)
    finally:
        stop(proc)
    return {
        "ping_p50_ms": round(percentile(rtts, 50) * 1000, 3),
        "ping_p99_ms": round(percentile(rtts, 99) * 1000, 3),
        "mib_s": round(mib_s, 1),
    }


PAIRS = {
    "ours_to_ours": ("ours", "ours"),
    "ours_to_py": ("ours", "py"),
    "py_to_ours": ("py", "ours"),
    "py_to_py": ("py", "py"),
}


def ratios(figures: dict[str, dict[str, float]]) -> dict[str, float]:
    ours, base = figures["ours_to_ours"], figures["py_to_py"]
    return {
        "throughput_ratio": round(ours["mib_s"] / base["mib_s"], 2),
        "ping_ratio": round(ours["ping_p50_ms"] / base["ping_p50_ms"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pings", type=int, default=500)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve())
        return
    if not PY.exists():
        sys.exit(f"py-libp2p's venv is missing ({PY}): make .venv-libp2p/.installed")
    size = args.mib << 20
    rounds = []
    for n in range(args.rounds):
        measured = {name: pair(dialer, kind, args.pings, size) for name, (dialer, kind) in PAIRS.items()}
        rounds.append({**measured, **ratios(measured)})
        for name, row in measured.items():
            ping = f"ping p50 {row['ping_p50_ms']:7.3f} ms  p99 {row['ping_p99_ms']:7.3f} ms"
            print(f"round {n + 1}  {name:13} {ping}  {row['mib_s']:7.1f} MiB/s")
        print(f"round {n + 1}  {ratios(measured)}")
    figures = {
        name: {key: statistics.median(r[name][key] for r in rounds) for key in rounds[0][name]} for name in PAIRS
    }
    for name, row in figures.items():
        ping = f"ping p50 {row['ping_p50_ms']:7.3f} ms  p99 {row['ping_p99_ms']:7.3f} ms"
        print(f"median   {name:13} {ping}  {row['mib_s']:7.1f} MiB/s")
    from villagemesh.actors.libp2p.aead import BULK_AEAD

    cipher = "libsodium" if BULK_AEAD is None else "openssl"  # ours' bulk frames ('fast' extra installed or not)
    emit("libp2p", pings=args.pings, mib=args.mib, bulk_cipher=cipher, **figures, **ratios(figures), rounds=rounds)


if __name__ == "__main__":
    main()
