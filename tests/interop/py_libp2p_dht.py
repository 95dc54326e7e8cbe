"""A DHT of N real py-libp2p hosts for the Kademlia interop tests (run in py-libp2p's venv; trio).

    python py_libp2p_dht.py N

Starts N hosts on 127.0.0.1, each a ``KadDHT`` in server mode, connected in a chain (host i
knows host i-1), prints ``HOST <i> <multiaddr>`` for each, then ``READY``, and answers
commands on stdin, one a line, until stdin closes:

    CONNECT <i> <multiaddr>          host i connects to that peer and adds it to its table -> CONNECTED <i>
    PROVIDE <i> <hex key>            host i provides the key (a multihash, hex)            -> PROVIDED <i> <ok>
    PROVIDERS <i> <hex key>          host i looks the key's providers up                   -> PROVIDERS <i> <ids,...>
    FIND_PEER <i> <peer id>          host i looks the peer up                              -> PEER <i> <addrs,...>
"""

import logging
import os
import sys

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

logging.disable(logging.WARNING)  # py-libp2p warns on every normal kad stream close (research §2.1)


async def main(count: int) -> None:
    hosts = [new_host(key_pair=create_new_key_pair()) for _ in range(count)]
    async with trio.open_nursery():
        started = []
        for host in hosts:
            context = host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")])
            await context.__aenter__()
            started.append(context)
        dhts = [KadDHT(host, DHTMode.SERVER) for host in hosts]
        for i in range(1, count):
            address = f"{hosts[i - 1].get_addrs()[0]}"
            await hosts[i].connect(info_from_p2p_addr(multiaddr.Multiaddr(address)))
            await dhts[i].routing_table.add_peer(hosts[i - 1].get_id())
            await dhts[i - 1].routing_table.add_peer(hosts[i].get_id())
        services = []
        for dht in dhts:
            service = background_trio_service(dht)
            await service.__aenter__()
            services.append(service)
        for i, host in enumerate(hosts):
            print("HOST", i, host.get_addrs()[0], flush=True)
        print("READY", flush=True)
        lines = trio.wrap_file(sys.stdin)
        async for line in lines:
            words = line.split()
            if not words:
                continue
            i = int(words[1])
            try:
                if words[0] == "CONNECT":
                    info = info_from_p2p_addr(multiaddr.Multiaddr(words[2]))
                    await hosts[i].connect(info)
                    await dhts[i].routing_table.add_peer(info.peer_id)
                    print("CONNECTED", i, flush=True)
                elif words[0] == "PROVIDE":
                    print("PROVIDED", i, await dhts[i].provide(words[2]), flush=True)
                elif words[0] == "PROVIDERS":
                    found = await dhts[i].find_providers(words[2])
                    print("PROVIDERS", i, ",".join(sorted({str(p.peer_id) for p in found})) or "-", flush=True)
                elif words[0] == "FIND_PEER":
                    info = await dhts[i].find_peer(ID.from_base58(words[2]))
                    print("PEER", i, ",".join(str(a) for a in info.addrs) if info else "-", flush=True)
            except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
                print("ERROR", i, type(exc).__name__, exc, flush=True)
        sys.stdout.flush()
        os._exit(0)  # the test closed stdin: done (py-libp2p's services do not shut down quietly)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
