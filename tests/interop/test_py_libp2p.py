"""Interop with a real py-libp2p host: our sans-I/O libp2p layers, driven by a plain asyncio dialer, against it.

py-libp2p lives in a venv of its own (it pins ~70 packages; research/libp2p.md §1.1), which
``make test`` creates (``.venv-libp2p``); this module is skipped, with the reason, where
that venv is missing. What crosses the wire, both ways (we dial it; it
dials us): TCP, multistream-select, libp2p Noise (the identity payload checked against
the peer id in the multiaddr dialled), multistream-select, yamux (pings answered),
then ``/ipfs/ping/1.0.0`` and ``/ipfs/id/1.0.0`` streams.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.libp2p_dialer import Dialer
from villagemesh.errors import RemoteProtocolError
from villagemesh.protocols.framing import NEED_DATA
from villagemesh.protocols.libp2p.identify import IDENTIFY_PROTOCOL, PING_BYTES, PING_PROTOCOL, Identify, check_pong
from villagemesh.protocols.libp2p.peerid import Multiaddr, PeerId
from villagemesh.protocols.libp2p.varint import UvarintFramer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PYTHON = Path(os.environ.get("VILLAGEMESH_LIBP2P_PYTHON", ROOT / ".venv-libp2p" / "bin" / "python"))
PEER = Path(__file__).with_name("py_libp2p_peer.py")


@pytest.fixture
def py_peer() -> Iterator[Multiaddr]:
    if not PYTHON.exists():
        pytest.skip(f"py-libp2p's venv is missing ({PYTHON}); `make test` creates it")
    proc = subprocess.Popen([str(PYTHON), str(PEER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("LISTEN "):
                yield Multiaddr.parse(line.split()[1])
                break
        else:
            pytest.fail(f"py-libp2p exited ({proc.wait()}) without a LISTEN line")
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[str]) -> None:
    """End a py-libp2p process by closing its stdin (killed if it lingers), and close its pipes."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    proc.stdout.close()  # an unclosed pipe is reported (unraisably) in whichever test runs next


def run(coro: object) -> object:
    """One bounded asyncio run (py-libp2p on a loaded machine is slow to answer: 90 s, reached only on a hang)."""
    return asyncio.run(asyncio.wait_for(coro, 90))  # type: ignore[arg-type]


def test_we_dial_py_libp2p_and_ping_it_on_one_stream(py_peer: Multiaddr) -> None:
    async def body() -> None:
        peer_id = py_peer.peer_id()
        assert peer_id is not None
        dialer = await Dialer.connect(py_peer.value("ip4") or "", int(py_peer.value("tcp") or 0), peer_id)
        assert dialer.remote == peer_id
        stream, rest = await dialer.open(PING_PROTOCOL)
        for n in range(5):
            ping = os.urandom(PING_BYTES)
            dialer.write(stream, ping)
            check_pong(ping, await dialer.read(stream, PING_BYTES, rest if n == 0 else b""))
        await dialer.close()

    run(body())


def test_py_libp2p_identifies_itself_to_us(py_peer: Multiaddr) -> None:
    async def body() -> Identify:
        peer_id = py_peer.peer_id()
        assert peer_id is not None
        dialer = await Dialer.connect(py_peer.value("ip4") or "", int(py_peer.value("tcp") or 0), peer_id)
        stream, rest = await dialer.open(IDENTIFY_PROTOCOL)
        framer = UvarintFramer(64 * 1024)
        framer.receive_data(rest)
        while (frame := framer.next_frame()) is NEED_DATA:
            framer.receive_data(await dialer.read(stream, 1))
        await dialer.close()
        assert isinstance(frame, bytes)
        return Identify.decode(frame)

    identify = run(body())
    assert isinstance(identify, Identify)
    assert identify.peer_id == py_peer.peer_id()
    assert PING_PROTOCOL in identify.protocols and identify.agent_version.startswith("py-libp2p")
    assert any(a.value("tcp") == py_peer.value("tcp") for a in identify.listen_addrs)


def test_dialling_py_libp2p_as_another_peer_id_is_refused(py_peer: Multiaddr) -> None:
    someone_else = PeerId.from_ed25519(bytes(32))

    async def body() -> None:
        await Dialer.connect(py_peer.value("ip4") or "", int(py_peer.value("tcp") or 0), someone_else)

    with pytest.raises(RemoteProtocolError, match="dialled"):
        run(body())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))


def test_py_libp2p_dials_us_pings_us_and_reads_our_identify() -> None:
    if not PYTHON.exists():
        pytest.skip(f"py-libp2p's venv is missing ({PYTHON}); `make test` creates it")
    from tests.interop.libp2p_dialer import Listener

    async def body() -> tuple[Listener, list[str]]:
        listener = Listener()
        address = await listener.start()
        proc = await asyncio.create_subprocess_exec(
            str(PYTHON), str(PEER), "--dial", address, "--pings", "4", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 80)
        await proc.wait()
        lines = out.decode().split("\n")
        await listener.stop()
        return listener, lines

    listener, lines = run(body())  # type: ignore[misc]
    assert [line for line in lines if line.startswith("PING")] == [f"PING {n} ok" for n in range(4)], lines
    [identify] = [line for line in lines if line.startswith("IDENTIFY ")]
    assert identify.split()[1] == "villagemesh-interop/0.1" and PING_PROTOCOL in identify
    assert "DONE" in lines and listener.pings == 4
    # py-libp2p identifies a peer by itself on connect, and the script asked once more
    assert len(listener.identified) >= 1 and len(set(listener.identified)) == 1
