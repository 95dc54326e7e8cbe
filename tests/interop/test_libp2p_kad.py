"""Our Kademlia (actors/libp2p/kad.py on Libp2pHost) in a DHT of five real py-libp2p hosts, both ways.

We bootstrap from one py-libp2p host and then: FIND_NODE walks to all five; we provide a key and
py-libp2p finds us as its provider; py-libp2p provides a key and we find it; py-libp2p finds our
peer (and address) by its id through the DHT.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.interop.test_py_libp2p import PYTHON, run, stop
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.libp2p.host import Libp2pHost
from villagemesh.actors.libp2p.kad import PROVIDER_KEY, Kademlia
from villagemesh.actors.libp2p.state import listen_multiaddr
from villagemesh.protocols.libp2p.peerid import Multiaddr, PeerId

pytestmark = pytest.mark.slow

DHT = os.path.join(os.path.dirname(__file__), "py_libp2p_dht.py")


class PyDht:
    """The py-libp2p DHT process: its hosts' multiaddrs, and one command at a time."""

    def __init__(self, proc: subprocess.Popen[str], hosts: list[Multiaddr]) -> None:
        self.proc, self.hosts = proc, hosts

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert not answer.startswith("ERROR"), answer
        return answer


@pytest.fixture
def py_dht() -> Iterator[PyDht]:
    if not PYTHON.exists():
        pytest.skip(f"py-libp2p's venv is missing ({PYTHON}); `make test` creates it")
    proc = subprocess.Popen([str(PYTHON), DHT, "5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        hosts = []
        for line in proc.stdout:
            if line.startswith("HOST "):
                hosts.append(Multiaddr.parse(line.split()[2]))
            elif line.startswith("READY"):
                break
        assert len(hosts) == 5, f"py-libp2p's DHT did not come up ({proc.poll()})"
        yield PyDht(proc, hosts)
    finally:
        stop(proc)


def test_our_kademlia_and_py_libp2ps_dht_find_nodes_and_providers_both_ways(py_dht: PyDht) -> None:
    theirs = hashlib.sha256(b"py-libp2p provides this").digest()
    their_key = bytes([0x12, 0x20]) + theirs

    async def body() -> dict[str, object]:
        keys = NodeKeys.generate()
        server = await asyncio.get_running_loop().create_server(lambda: host.protocol_factory(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        host = Libp2pHost(keys, lambda message, raw, node_id: None, listen=listen_multiaddr("127.0.0.1", port))
        kad = Kademlia(host)
        kad.add(str(py_dht.hosts[0]))
        out: dict[str, object] = {"me": str(host.peer_id)}
        try:
            out["found"] = {str(p.peer_id) for p in await kad.find_node(os.urandom(34))}
            out["told"] = await kad.provide(PROVIDER_KEY)
            asked = await asyncio.to_thread(py_dht.ask, f"PROVIDERS 4 {PROVIDER_KEY.hex()}")
            out["their_providers"] = asked.split()[2].split(",")
            assert (await asyncio.to_thread(py_dht.ask, f"PROVIDE 2 {their_key.hex()}")).startswith("PROVIDED 2")
            out["our_providers"] = {str(p.peer_id) for p in await kad.find_providers(their_key)}
            out["their_find_peer"] = await asyncio.to_thread(py_dht.ask, f"FIND_PEER 4 {host.peer_id}")
            out["served"] = {k: v for k, v in host.counts.items() if k.startswith("kad_served")}
        finally:
            await host.close()
            server.close()
            await server.wait_closed()
        return out

    result = run(body())
    assert isinstance(result, dict)
    everyone = {str(m.peer_id()) for m in py_dht.hosts}
    assert result["found"] == everyone, result  # FIND_NODE: the walk reached all five
    assert result["told"] == 5
    assert result["me"] in result["their_providers"], result  # py-libp2p found us as the provider
    assert str(PeerId.from_text(str(py_dht.hosts[2].peer_id()))) in result["our_providers"], result
    assert "/tcp/" in str(result["their_find_peer"]) and result["their_find_peer"] != "PEER 4 -", result
