"""Connection caps that hold, through a whole node on real sockets, loopback only.

Floods come from several ``127.0.x.y`` source addresses (every 127/8 address is
local on Linux), so the per-source cap alone cannot stop them: the total cap,
counted until a connection closes whichever actor serves it, must.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import time
from pathlib import Path

import pytest

from tests.integration._nodes import PATIENCE, EventFile, Inbox, make_node, running, wait_until

pytestmark = pytest.mark.slow

HEALTH = b"GET /health HTTP/1.1\r\nHost: node\r\n\r\n"


def _raise_nofile(at_least: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < at_least:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(at_least, hard), hard))


async def _answered(port: int, source: str, request: bytes, timeout: float) -> tuple[bool, asyncio.StreamWriter]:
    """Connect from ``source``, send ``request``: whether an HTTP answer came (the connection stays open)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(request)
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (ConnectionResetError, TimeoutError):
        return False, writer
    return line.startswith(b"HTTP/1.1 200"), writer


def test_the_total_cap_counts_handed_off_connections_until_they_close(tmp_path: Path) -> None:
    """200 kept-alive HTTP connections from 20 sources, 10 each: 64 are served, the rest refused at once."""
    _raise_nofile(4096)
    node = make_node(tmp_path / "a", "a", max_connections=64, max_connections_per_source=10)
    log = EventFile(node.log_path)
    with running([node]):

        async def flood() -> list[bool]:
            sources = [f"127.0.3.{i}" for i in range(1, 21)]
            results = []
            writers = []
            for i in range(200):  # one at a time: each is served (and held) or refused before the next
                ok, writer = await _answered(node.port, sources[i % 20], HEALTH, PATIENCE)
                results.append(ok)
                writers.append(writer)
            for writer in writers:
                writer.close()
            return results

        began = time.monotonic()
        results = asyncio.run(flood())
        assert sum(results) == 64 and results[:64] == [True] * 64
        # 136 refusals: a few written in full each second, the rest summed up, not a line each
        assert wait_until(lambda: sum(e["by_kind"].get("cap", 0) for e in log.matching("connections_refused")) > 0)
        lines = log.matching("connection_rejected")
        assert len(lines) <= 10 * (time.monotonic() - began + 2) and len(lines) < 136
        # once they are closed, their slots are free again
        assert wait_until(lambda: asyncio.run(_answered(node.port, "127.0.3.1", HEALTH, PATIENCE))[0])


def test_half_sent_headers_are_dropped_at_the_handshake_deadline_and_refusals_are_summed_up(tmp_path: Path) -> None:
    """Slowloris on the HTTP route: 100 connections sending half a header are all closed after the
    deadline, and the log says so in a few lines, not a hundred."""
    _raise_nofile(4096)
    node = make_node(tmp_path / "a", "a", handshake_timeout=0.5)
    log = EventFile(node.log_path)
    with running([node]):
        socks = []
        for i in range(100):
            sock = socket.create_connection(
                ("127.0.0.1", node.port), timeout=PATIENCE, source_address=(f"127.0.4.{i % 10 + 1}", 0)
            )
            sock.sendall(b"GET / HTTP/1.1\r\nHost: node\r\nX-Slow: ")
            socks.append(sock)
        began = time.monotonic()
        for sock in socks:
            try:
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass  # aborted: closed all the same
            sock.close()
        assert time.monotonic() - began < PATIENCE
        assert wait_until(lambda: sum(e["count"] for e in log.matching("connections_refused")) >= 90)
        rejected = log.matching("connection_rejected")
        assert 1 <= len(rejected) <= 20 and all("handshake" in e["reason"] for e in rejected)


def test_under_a_flood_from_many_sources_a_peer_keeps_delivering_and_a_new_one_connects_in_a_second(
    tmp_path: Path,
) -> None:
    """Silent connections from 8 sources, each up to its cap and together far over the total cap: an
    established peer's messages keep arriving, a new client is answered within 1 s, and a new node
    joins and delivers."""
    _raise_nofile(8192)
    node = make_node(tmp_path / "a", "a", max_connections=100)
    peer = make_node(tmp_path / "p", "p", bootstrap=[node.acceptor_address])
    inbox = Inbox()
    node.subscribe("*", inbox)
    with running([node, peer]):
        assert wait_until(lambda: node.node_id in {p.peer_id for p in peer.peers()})
        assert peer.send(node.node_id, b"before").result(PATIENCE).delivered
        stop = asyncio.Event()

        async def flood() -> int:
            held: list[asyncio.StreamWriter] = []
            attempts = 0
            for round_ in range(40):  # bounded: 40 rounds of 100 attempts from 8 sources
                for i in range(100):
                    source = f"127.0.5.{(round_ * 100 + i) % 8 + 1}"
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", node.port, local_addr=(source, 0))
                    except OSError:
                        continue
                    held.append(writer)
                    attempts += 1
                await asyncio.sleep(0)
                if stop.is_set():
                    break
            for writer in held:
                writer.close()
            return attempts

        newcomer = make_node(tmp_path / "n", "n", bootstrap=[node.acceptor_address])

        def join() -> bool:
            newcomer.start()
            if not wait_until(lambda: node.node_id in {p.peer_id for p in newcomer.peers()}):
                return False
            return bool(newcomer.send(node.node_id, b"newcomer").result(PATIENCE).delivered)

        async def meanwhile() -> tuple[list[float], list[bool]]:
            task = asyncio.create_task(flood())
            await asyncio.sleep(0.2)  # the flood is on
            joined = asyncio.create_task(asyncio.to_thread(join))
            waits, delivered = [], []
            for n in range(5):
                began = time.monotonic()
                ok, writer = await _answered(node.port, "127.0.0.1", HEALTH, 1.0)
                waits.append(time.monotonic() - began if ok else float("inf"))
                writer.close()
                handle = await asyncio.to_thread(peer.send, node.node_id, b"during %d" % n)
                delivered.append((await asyncio.to_thread(handle.result, PATIENCE)).delivered)
            delivered.append(await joined)
            stop.set()
            await task
            return waits, delivered

        try:
            waits, delivered = asyncio.run(meanwhile())
        finally:
            newcomer.stop()
        assert all(w < 1.0 for w in waits), waits
        assert delivered == [True] * 6
        assert inbox.wait_for_distinct(7)
