"""A real py-libp2p host for the interop tests (run by them in py-libp2p's own venv; trio, not asyncio).

    python py_libp2p_peer.py [--seed HEX32]                 listen
    python py_libp2p_peer.py --dial MULTIADDR [--pings N] [--bulk BYTES]   dial, ping, identify, exit

Listening: on 127.0.0.1 (a port the kernel picks) with Noise only and yamux, serving
py-libp2p's own identify and ping, ``/echo/1.0.0`` (every byte back, until the
dialler closes) and ``/sink/1.0.0`` (counts bytes until the dialler closes, then answers
the count as a u64); prints ``LISTEN <multiaddr>`` and waits for stdin to close. Dialling:
connects to the multiaddr (its ``/p2p/`` part checked by py-libp2p), pings it N times on
one stream and prints ``PING <n> ok``; with ``--bulk``, writes BYTES random bytes on one
``/ipfs/ping/1.0.0`` stream while reading the echo and prints ``BULK <bytes> ok|WRONG
<seconds>`` (the SHA-256 of what came back against what went); with ``--sink``, uploads
BYTES on ``/sink/1.0.0`` and prints ``SINK <bytes counted> <seconds>``; prints ``RTTS`` (every
ping's round trip, seconds); asks its identify and
prints ``IDENTIFY <agent version> <protocols, comma-separated>`` and ``IDENTIFY_KEY ok``
when the identify's key is the peer id dialled, then ``DONE``. Its dial artefact (a 250 ms
wait after every dial, research/libp2p.md §6) costs 250 ms once.
"""

import argparse
import sys

import libp2p
import multiaddr
import trio
from libp2p import NoiseTransport, new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as x25519_key_pair
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE


async def main(seed: str | None) -> None:
    keys = create_new_key_pair(bytes.fromhex(seed)) if seed else create_new_key_pair()
    security = {NOISE: NoiseTransport(keys, noise_privkey=x25519_key_pair().private_key)}
    host = new_host(key_pair=keys, sec_opt=security, muxer_preference="YAMUX")

    async def echo(stream) -> None:
        try:
            while True:
                chunk = await stream.read(65536)
                if not chunk:
                    break
                await stream.write(chunk)
        except Exception:  # noqa: BLE001 - py-libp2p ends a stream with an exception (research §6)
            pass
        await stream.close()

    async def sink(stream) -> None:
        count = 0
        try:
            while True:
                chunk = await stream.read(65536)
                if not chunk:
                    break
                count += len(chunk)
        except Exception:  # noqa: BLE001 - py-libp2p ends a stream with an exception (research §6)
            pass
        await stream.write(count.to_bytes(8, "big"))
        await stream.close()

    host.set_stream_handler("/echo/1.0.0", echo)
    host.set_stream_handler("/sink/1.0.0", sink)
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        print("VERSION", libp2p.__version__, flush=True)
        for address in host.get_addrs():
            print("LISTEN", address, flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the test closes our stdin


async def bulk(stream, size: int) -> None:
    import hashlib
    import os
    import time

    sent, got = hashlib.sha256(), hashlib.sha256()
    started = time.perf_counter()

    async def write() -> None:
        left = size
        while left:
            chunk = os.urandom(min(65536, left))
            sent.update(chunk)
            await stream.write(chunk)
            left -= len(chunk)

    async def read() -> None:
        have = 0
        while have < size:
            chunk = await stream.read(min(65536, size - have))
            got.update(chunk)
            have += len(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        nursery.start_soon(read)
    seconds = time.perf_counter() - started
    print(f"BULK {size} {'ok' if sent.digest() == got.digest() else 'WRONG'} {seconds:.3f}", flush=True)


async def upload(stream, size: int) -> None:
    import time

    chunk = bytes(65536)
    started = time.perf_counter()
    left = size
    while left:
        await stream.write(chunk[: min(len(chunk), left)])
        left -= min(len(chunk), left)
    await stream.close()
    answer = b""
    while len(answer) < 8:
        answer += await stream.read(8 - len(answer))
    seconds = time.perf_counter() - started
    print(f"SINK {int.from_bytes(answer, 'big')} {seconds:.4f}", flush=True)


async def dial(address: str, pings: int, size: int, sink: int) -> None:
    import os
    import time

    from libp2p.custom_types import TProtocol
    from libp2p.identity.identify.identify import ID as IDENTIFY
    from libp2p.identity.identify.pb.identify_pb2 import Identify
    from libp2p.peer.peerinfo import info_from_p2p_addr

    host = new_host(key_pair=create_new_key_pair(), muxer_preference="YAMUX")
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        info = info_from_p2p_addr(multiaddr.Multiaddr(address))
        await host.connect(info)
        stream = await host.new_stream(info.peer_id, [TProtocol("/ipfs/ping/1.0.0")])
        rtts = []
        for n in range(pings):
            ping = os.urandom(32)
            started = time.perf_counter()
            await stream.write(ping)
            answer = b""
            while len(answer) < 32:
                answer += await stream.read(32 - len(answer))
            rtts.append(time.perf_counter() - started)
            print(f"PING {n} {'ok' if answer == ping else 'WRONG'}", flush=True)
        await stream.close()
        if rtts:
            print("RTTS", " ".join(f"{r:.7f}" for r in rtts), flush=True)
        if sink:
            stream = await host.new_stream(info.peer_id, [TProtocol("/sink/1.0.0")])
            await upload(stream, sink)
        if size:
            stream = await host.new_stream(info.peer_id, [TProtocol("/ipfs/ping/1.0.0")])
            await bulk(stream, size)
            await stream.close()
        stream = await host.new_stream(info.peer_id, [IDENTIFY])
        data = b""
        try:
            while True:
                chunk = await stream.read(65536)
                if not chunk:
                    break
                data += chunk
        except Exception:  # noqa: BLE001 - py-libp2p ends a stream with an exception (research §6)
            pass
        size, at = 0, 0
        for shift in range(0, 64, 7):
            size |= (data[at] & 0x7F) << shift
            at += 1
            if not data[at - 1] & 0x80:
                break
        identify = Identify()
        identify.ParseFromString(data[at : at + size])
        print("IDENTIFY", identify.agent_version, ",".join(identify.protocols), flush=True)
        from libp2p.crypto.serialization import deserialize_public_key
        from libp2p.peer.id import ID

        key_ok = ID.from_pubkey(deserialize_public_key(identify.public_key)) == info.peer_id
        print("IDENTIFY_KEY", "ok" if key_ok else "WRONG", flush=True)
        print("DONE", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed")
    parser.add_argument("--dial")
    parser.add_argument("--pings", type=int, default=3)
    parser.add_argument("--bulk", type=int, default=0)
    parser.add_argument("--sink", type=int, default=0, help="bytes to upload on /sink/1.0.0 (timed)")
    args = parser.parse_args()
    if args.dial:
        import libp2p.network.swarm as swarm

        swarm._HAPPY_EYEBALLS_DELAY = 0.0  # research/libp2p.md §6: a fixed 250 ms wait after each dial
        trio.run(dial, args.dial, args.pings, args.bulk, args.sink)
    else:
        trio.run(main, args.seed)
