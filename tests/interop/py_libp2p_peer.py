"""A real py-libp2p host for the interop tests (run by them in py-libp2p's own venv; trio, not asyncio).

    python py_libp2p_peer.py [--seed HEX32]

Listens on 127.0.0.1 (a port the kernel picks) with Noise only and yamux, serves
py-libp2p's own identify and ping, prints ``LISTEN <multiaddr>`` and waits for stdin
to close. Its dial artefact (a 250 ms wait after every dial, research/libp2p.md §6)
does not matter here: it only listens.
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
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        print("VERSION", libp2p.__version__, flush=True)
        for address in host.get_addrs():
            print("LISTEN", address, flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the test closes our stdin


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed")
    trio.run(main, parser.parse_args().seed)
