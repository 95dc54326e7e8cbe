"""Interop of the libp2p transport actor's driver with real py-libp2p, both ways.

- py-libp2p dials a villagemesh node's single port (the acceptor sniffs multistream and hands the
  connection to the ``libp2p`` actor): it verifies our Noise identity and our identify, pings us
  100 times, and sends 64 MiB on one ``/ipfs/ping/1.0.0`` stream that we echo (flow control both ways);
- our :class:`~villagemesh.actors.libp2p.host.Libp2pHost` dials py-libp2p: it reads and checks
  py-libp2p's identify, pings it 100 times and moves 64 MiB through its ``/echo/1.0.0`` intact;
- a corrupted Noise message and a wrong ``/p2p/`` id are refused by py-libp2p too.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from tests.interop.libp2p_dialer import Dialer
from tests.interop.test_py_libp2p import PEER, PYTHON, py_peer, run  # noqa: F401 - the fixture
from villagemesh import create_network
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.libp2p.host import Libp2pHost
from villagemesh.actors.libp2p.state import node_id_of
from villagemesh.errors import ConnectError
from villagemesh.protocols.framing import NEED_DATA
from villagemesh.protocols.libp2p.identify import IDENTIFY_PROTOCOL, PING_BYTES, PING_PROTOCOL, Identify, check_pong
from villagemesh.protocols.libp2p.multistream import HEADER, message
from villagemesh.protocols.libp2p.peerid import Multiaddr, PeerId
from villagemesh.protocols.libp2p.varint import UvarintFramer

pytestmark = pytest.mark.slow

BULK = 64 * 1024 * 1024


def test_py_libp2p_dials_our_nodes_port_identifies_pings_100_times_and_moves_64_mib(tmp_path: Path) -> None:
    if not PYTHON.exists():
        pytest.skip(f"py-libp2p's venv is missing ({PYTHON}); `make test` creates it")
    node = create_network("hybrid", name="n", data_dir=tmp_path / "n", lan=False).start()
    try:

        async def body() -> list[str]:
            proc = await asyncio.create_subprocess_exec(
                str(PYTHON),
                str(PEER),
                "--dial",
                node.libp2p_address,
                "--pings",
                "100",
                "--bulk",
                str(BULK),
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 85)
            return out.decode().split("\n")

        lines = run(body())
    finally:
        node.stop()
    assert isinstance(lines, list)
    assert [line for line in lines if line.startswith("PING")] == [f"PING {n} ok" for n in range(100)], lines
    [bulk] = [line for line in lines if line.startswith("BULK")]
    assert bulk.split()[:3] == ["BULK", str(BULK), "ok"], bulk
    [identify] = [line for line in lines if line.startswith("IDENTIFY ")]
    assert identify.split()[1].startswith("villagemesh/") and "/villagemesh/envelope/1.0.0" in identify
    assert "IDENTIFY_KEY ok" in lines and "DONE" in lines


def test_our_host_dials_py_libp2p_checks_its_identify_pings_100_times_and_moves_64_mib(py_peer: Multiaddr) -> None:  # noqa: F811
    peer_id = py_peer.peer_id()
    assert peer_id is not None

    async def body() -> tuple[Identify, str]:
        host = Libp2pHost(NodeKeys.generate(), lambda message, raw, node_id: None)
        try:
            identify_stream = await host.open_stream(str(py_peer), IDENTIFY_PROTOCOL)
            framer = UvarintFramer(64 * 1024)
            while (raw := framer.next_frame()) is NEED_DATA:
                chunk = await identify_stream.read()
                assert chunk, "identify ended before its frame"
                framer.receive_data(chunk)
            assert isinstance(raw, bytes)
            identify = Identify.decode(raw)

            ping = await host.open_stream(str(py_peer), PING_PROTOCOL)
            for _ in range(100):
                payload = os.urandom(PING_BYTES)
                await ping.write(payload)
                check_pong(payload, await ping.read_exactly(PING_BYTES))
            ping.close()

            echo = await host.open_stream(str(py_peer), "/echo/1.0.0")
            sent, got = hashlib.sha256(), hashlib.sha256()

            async def write() -> None:
                for _ in range(BULK // 65536):
                    chunk = os.urandom(65536)
                    sent.update(chunk)
                    await echo.write(chunk)
                echo.close()

            async def read() -> None:
                have = 0
                while have < BULK:
                    chunk = await echo.read()
                    assert chunk, f"the echo ended after {have} bytes"
                    got.update(chunk)
                    have += len(chunk)

            await asyncio.gather(write(), read())
            assert sent.digest() == got.digest()
            assert len(host.peers) == 1  # one connection, three streams
            return identify, str(next(iter(host.peers)))
        finally:
            await host.close()

    result = run(body())
    assert isinstance(result, tuple)
    identify, node_id = result
    assert identify.peer_id == peer_id and identify.agent_version.startswith("py-libp2p")
    assert node_id == node_id_of(peer_id)


def test_our_host_refuses_py_libp2p_under_another_peer_id(py_peer: Multiaddr) -> None:  # noqa: F811
    someone_else = PeerId.from_ed25519(bytes(range(32)))
    wrong = str(py_peer).rsplit("/p2p/", 1)[0] + f"/p2p/{someone_else}"

    async def body() -> None:
        host = Libp2pHost(NodeKeys.generate(), lambda message, raw, node_id: None)
        try:
            await host.open_stream(wrong, PING_PROTOCOL)
        finally:
            await host.close()

    with pytest.raises(ConnectError, match=str(someone_else)):
        run(body())


def test_py_libp2p_drops_a_corrupted_noise_message(py_peer: Multiaddr) -> None:  # noqa: F811
    async def body() -> tuple[bool, bool]:
        host, port = py_peer.value("ip4") or "", int(py_peer.value("tcp") or 0)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(message(HEADER) + message("/noise"))
        await reader.readexactly(len(message(HEADER) + message("/noise")))  # agreed
        writer.write(b"\x00\x20" + os.urandom(32))  # message 1: an ephemeral key, well formed
        size = int.from_bytes(await reader.readexactly(2), "big")
        await reader.readexactly(size)  # py-libp2p's message 2
        writer.write(b"\x00\x60" + os.urandom(96))  # message 3: bytes no key encrypted
        closed = await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
        # and it still serves a well-behaved dialer afterwards
        expected = py_peer.peer_id()
        assert expected is not None
        dialer = await Dialer.connect(host, port, expected)
        still = dialer.remote == expected
        await dialer.close()
        return closed, still

    assert run(body()) == (True, True)
