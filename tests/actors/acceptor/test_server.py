"""The sniffing acceptor on real loopback sockets: routing, rejections, limits, hand-offs."""

from __future__ import annotations

import asyncio
import itertools
import resource
import socket
from collections.abc import Callable
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.actors.acceptor.support import run, until
from villagemesh.actors.acceptor.server import AcceptorServer
from villagemesh.actors.acceptor.state import AcceptorLimits
from villagemesh.actors.core.handoff import HandedOff, Route, adopt
from villagemesh.actors.core.loopthread import LoopThread
from villagemesh.protocols.sniff import MULTISTREAM_HEADER, SECURE_MAGIC

FIRST_BYTES = {
    Route.DISCOVERY: b"\x00\x00\x00\x02{}",
    Route.SECURE: SECURE_MAGIC + b"\x01" + bytes(range(40)),
    Route.LIBP2P: MULTISTREAM_HEADER + b"\x0d/noise/1.0.0\n",
    Route.HTTP: b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    Route.TLS: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
}


class Collector(asyncio.Protocol):
    """An in-loop handler: greets with its route, keeps every byte, resolves on EOF."""

    def __init__(self, route: Route, done: Callable[[Route, bytes], None]) -> None:
        self.route = route
        self.done = done
        self.data = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.route.value.encode() + b"\n")

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.done(self.route, bytes(self.data))
        return False


async def start_acceptor(
    limits: AcceptorLimits | None = None, routes: tuple[Route, ...] = tuple(Route)
) -> tuple[AcceptorServer, int, asyncio.Queue[tuple[Route, bytes]]]:
    """An acceptor whose given routes are Collectors feeding a queue of (route, bytes)."""
    server = AcceptorServer(limits)
    got: asyncio.Queue[tuple[Route, bytes]] = asyncio.Queue()
    for route in routes:
        server.route_in_loop(route, lambda r=route: Collector(r, lambda rt, b: got.put_nowait((rt, b))))
    _, port = await server.start("127.0.0.1", 0)
    return server, port, got


async def connect(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection from a chosen loopback source address."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True once the server has closed (EOF or reset)."""
    try:
        return await reader.read(100) == b""
    except ConnectionResetError:
        return True


def rejections(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "connection_rejected"]


@pytest.mark.parametrize("route", list(Route))
def test_each_protocol_is_routed_with_every_peeked_byte(route: Route) -> None:
    """A connection speaking each protocol reaches its route's handler with all its bytes."""

    async def body() -> None:
        server, port, got = await start_acceptor()
        reader, writer = await connect(port)
        writer.write(FIRST_BYTES[route])
        assert await reader.readline() == route.value.encode() + b"\n"
        writer.write_eof()
        assert await got.get() == (route, FIRST_BYTES[route])
        writer.close()
        assert server.statistics()[f"routed.{route.value}"] == 1
        await server.close()

    run(body())


def test_garbage_is_closed_with_a_logged_reason() -> None:
    """Bytes no protocol starts with are refused: connection closed, reason logged with its keys."""

    async def body() -> list[dict[str, Any]]:
        server, port, _ = await start_acceptor()
        with structlog.testing.capture_logs() as logs:
            reader, writer = await connect(port)
            writer.write(b"\xffgarbage that is no protocol")
            assert await closed_by_server(reader)
            writer.close()
        await server.close()
        return logs

    (event,) = rejections(run(body()))
    assert event["reason"] == "unknown protocol"
    assert event["protocol"] == "unknown"
    assert event["peeked_bytes"] >= 1
    assert event["peer"].startswith("127.0.0.1:")


def test_oversized_discovery_length_prefix_is_rejected() -> None:
    """A discovery frame announcing more than the discovery limit never reaches a handler."""

    async def body() -> list[dict[str, Any]]:
        server, port, got = await start_acceptor()
        with structlog.testing.capture_logs() as logs:
            reader, writer = await connect(port)
            writer.write((2**31).to_bytes(4, "big") + b'{"type": "PEER_DISCOVERY"}')
            assert await closed_by_server(reader)
            writer.close()
        assert got.empty()
        await server.close()
        return logs

    (event,) = rejections(run(body()))
    assert event["reason"] == "unknown protocol"


def test_slowloris_is_dropped_after_the_sniff_timeout() -> None:
    """One byte then silence: the client is dropped when the sniff timeout passes."""

    async def body() -> list[dict[str, Any]]:
        server, port, _ = await start_acceptor(AcceptorLimits(sniff_timeout_s=0.2))
        with structlog.testing.capture_logs() as logs:
            reader, writer = await connect(port)
            writer.write(b"G")
            assert await closed_by_server(reader)
            writer.close()
        assert server.statistics()["open"] == 0
        await server.close()
        return logs

    (event,) = rejections(run(body()))
    assert event["reason"] == "no verdict within 0.2 s"
    assert event["protocol"] == "need_more"
    assert event["peeked_bytes"] == 1


def test_silent_client_is_dropped_after_the_sniff_timeout() -> None:
    """A client that sends nothing is dropped too."""

    async def body() -> None:
        server, port, _ = await start_acceptor(AcceptorLimits(sniff_timeout_s=0.1))
        reader, writer = await connect(port)
        assert await closed_by_server(reader)
        writer.close()
        assert server.statistics()["rejected.timeout"] == 1
        await server.close()

    run(body())


def test_route_without_a_handler_is_rejected_naming_it() -> None:
    """TLS with no TLS handler registered is closed with a reason naming the route."""

    async def body() -> list[dict[str, Any]]:
        server, port, _ = await start_acceptor(routes=(Route.HTTP,))
        with structlog.testing.capture_logs() as logs:
            reader, writer = await connect(port)
            writer.write(FIRST_BYTES[Route.TLS])
            assert await closed_by_server(reader)
            writer.close()
        await server.close()
        return logs

    (event,) = rejections(run(body()))
    assert event["reason"] == "no handler for route tls"
    assert event["protocol"] == "tls"


def test_per_source_cap_is_enforced_and_other_sources_still_served() -> None:
    """The cap-plus-one connection from one source is refused; another source gets through."""

    async def body() -> list[dict[str, Any]]:
        server, port, _ = await start_acceptor(AcceptorLimits(max_per_source=3, max_total=10))
        held = [await connect(port) for _ in range(3)]
        await until(lambda: server.limiter.count("127.0.0.1") == 3)
        with structlog.testing.capture_logs() as logs:
            reader, writer = await connect(port)
            assert await closed_by_server(reader)
            writer.close()
        other_reader, other_writer = await connect(port, source="127.0.0.2")
        other_writer.write(FIRST_BYTES[Route.HTTP])
        assert await other_reader.readline() == b"http\n"
        for _, w in held:
            w.close()
        other_writer.close()
        await until(lambda: server.limiter.total == 0)
        await server.close()
        return logs

    (event,) = rejections(run(body()))
    assert event["reason"] == "per-source cap 3 reached for 127.0.0.1"
    assert event["protocol"] is None


def test_in_loop_connection_counts_against_the_cap_until_it_closes() -> None:
    """A routed in-loop connection keeps its slot while open and frees it on close."""

    async def body() -> None:
        server, port, _ = await start_acceptor(AcceptorLimits(max_per_source=1, max_total=10))
        reader, writer = await connect(port)
        writer.write(FIRST_BYTES[Route.HTTP])
        assert await reader.readline() == b"http\n"
        assert server.limiter.count("127.0.0.1") == 1
        writer.close()
        await until(lambda: server.limiter.total == 0)
        await server.close()

    run(body())


def _raise_nofile(at_least: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < at_least:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(at_least, hard), hard))


@pytest.mark.slow
def test_a_thousand_concurrent_connections_leave_the_node_serving() -> None:
    """1,000 connections at once (garbage, silence, half requests) and a normal client is still served."""
    _raise_nofile(4096)

    async def body() -> dict[str, int]:
        server, port, _ = await start_acceptor(AcceptorLimits(sniff_timeout_s=0.5))
        payloads = [b"\xffjunk", b"", b"G", FIRST_BYTES[Route.HTTP][:10]]

        async def attacker(i: int) -> None:
            reader, writer = await connect(port)
            if payloads[i % 4]:
                writer.write(payloads[i % 4])
            await closed_by_server(reader)
            writer.close()

        with structlog.testing.capture_logs():
            attack = asyncio.gather(*(attacker(i) for i in range(1000)))
            await until(lambda: server.statistics().get("rejected.cap", 0) > 0)
            reader, writer = await connect(port, source="127.0.0.2")
            writer.write(FIRST_BYTES[Route.HTTP])
            assert await reader.readline() == b"http\n"
            writer.close()
            await attack
        await until(lambda: server.limiter.total == 0)
        stats = server.statistics()
        await server.close()
        return stats

    stats = run(body(), timeout=60)
    assert stats["routed.http"] >= 1
    assert stats["rejected.cap"] + stats["accepted"] >= 1000


# -- not one byte lost: random chunking, both hand-off modes ---------------------------------------

STREAMS = st.sampled_from([FIRST_BYTES[Route.HTTP], FIRST_BYTES[Route.LIBP2P], FIRST_BYTES[Route.DISCOVERY]])


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


async def _send_chunked(port: int, chunks: list[bytes]) -> None:
    reader, writer = await connect(port)
    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
        await asyncio.sleep(0.001)  # shapes the segments; nothing waits on it
    writer.write_eof()
    await reader.read()
    writer.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=STREAMS, tail=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_in_loop_hand_off_loses_and_reorders_nothing(head: bytes, tail: bytes, cuts: list[int]) -> None:
    """Whatever the client's write chunking, the in-loop handler sees exactly the bytes sent."""
    data = head + tail

    async def body() -> bytes:
        server, port, got = await start_acceptor()
        await _send_chunked(port, _chunks(data, cuts))
        _, received = await got.get()
        await server.close()
        return received

    assert run(body()) == data


class Sink(asyncio.Protocol):
    """A handler on another loop: collects bytes, answers b"bye" on EOF, then reports."""

    def __init__(self, done: Callable[[bytes], None]) -> None:
        self.done = done
        self.data = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        assert self.transport is not None
        self.transport.write(b"bye")
        self.transport.close()
        self.done(bytes(self.data))
        return True


@pytest.fixture(scope="module")
def other_loop() -> Any:
    """A second event loop in its own thread, standing in for another actor."""
    lt = LoopThread("adopter")
    lt.start()
    yield lt
    lt.stop()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(head=STREAMS, tail=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_cross_thread_hand_off_loses_and_reorders_nothing(
    other_loop: LoopThread, head: bytes, tail: bytes, cuts: list[int]
) -> None:
    """A socket adopted by another thread's loop sees exactly the bytes sent, and can answer."""
    data = head + tail

    async def body() -> tuple[bytes, bytes]:
        main = asyncio.get_running_loop()
        received: asyncio.Future[bytes] = main.create_future()

        def deliver(result: bytes) -> None:
            main.call_soon_threadsafe(received.set_result, result)

        async def take(handed: HandedOff) -> None:
            await adopt(handed, lambda: Sink(deliver))

        server = AcceptorServer()
        for route in (Route.HTTP, Route.LIBP2P, Route.DISCOVERY):
            server.route_hand_off(route, lambda h: asyncio.run_coroutine_threadsafe(take(h), other_loop.loop))
        _, port = await server.start()
        reader, writer = await connect(port)
        for chunk in _chunks(data, cuts):
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.001)  # shapes the segments; nothing waits on it
        writer.write_eof()
        answer = await reader.read()
        writer.close()
        await server.close()
        return await received, answer

    received, answer = run(body())
    assert received == data
    assert answer == b"bye"


def test_failing_hand_off_receiver_loses_the_connection_not_the_acceptor() -> None:
    """A hand-off callback that raises: that client is closed and logged; the next one is served."""

    def broken(handed: HandedOff) -> None:
        raise RuntimeError("receiver is gone")

    async def body() -> list[dict[str, Any]]:
        server, port, _ = await start_acceptor(routes=(Route.HTTP,))
        server.route_hand_off(Route.SECURE, broken)
        with structlog.testing.capture_logs() as logs:
            reader, writer = await connect(port)
            writer.write(FIRST_BYTES[Route.SECURE])
            assert await closed_by_server(reader)
            writer.close()
        reader, writer = await connect(port)
        writer.write(FIRST_BYTES[Route.HTTP])
        assert await reader.readline() == b"http\n"
        writer.close()
        await server.close()
        return logs

    (event,) = rejections(run(body()))
    assert event["reason"] == "hand-off failed: RuntimeError: receiver is gone"


class SmallBuffers(asyncio.BufferedProtocol):
    """A buffered in-loop handler with a 7-byte buffer: the peek must be fed across several buffers."""

    def __init__(self, done: Callable[[bytes], None]) -> None:
        self.done = done
        self.buf = bytearray(7)
        self.data = bytearray()

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.buf[:nbytes]

    def eof_received(self) -> bool:
        self.done(bytes(self.data))
        return False


def test_buffered_protocol_handler_gets_every_byte() -> None:
    """An in-loop BufferedProtocol handler receives the peek through its own small buffers, then the rest."""
    data = FIRST_BYTES[Route.HTTP] + bytes(range(256)) * 4

    async def body() -> tuple[bytes, dict[str, int]]:
        received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        server = AcceptorServer(AcceptorLimits(max_per_source=1, max_total=4))
        server.route_in_loop(Route.HTTP, lambda: SmallBuffers(received.set_result))
        _, port = await server.start()
        await _send_chunked(port, [data[:30], data[30:]])
        result = await received
        await until(lambda: server.limiter.total == 0)
        stats = server.statistics()
        await server.close()
        return result, stats

    result, stats = run(body())
    assert result == data
    assert stats["routed.http"] == 1


def test_a_handler_that_fails_to_start_loses_its_connection_not_its_cap_slot() -> None:
    """A route factory that raises: that client is closed and the source's slot is freed."""

    def broken() -> asyncio.Protocol:
        raise RuntimeError("handler bug")

    async def body() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, ctx: errors.append(ctx))
        server = AcceptorServer(AcceptorLimits(max_per_source=1, max_total=4))
        server.route_in_loop(Route.HTTP, broken)
        _, port = await server.start()
        reader, writer = await connect(port)
        writer.write(FIRST_BYTES[Route.HTTP])
        assert await closed_by_server(reader)
        writer.close()
        await until(lambda: server.limiter.total == 0)
        assert "handler bug" in str(errors[0].get("exception"))
        await server.close()

    run(body())


def test_at_the_total_cap_the_oldest_undecided_connection_makes_room_and_a_routed_one_never_does() -> None:
    """Total cap 3: one routed, two silent; a fourth client evicts the older silent one, not the routed."""

    async def body() -> list[dict[str, Any]]:
        server, port, _ = await start_acceptor(AcceptorLimits(max_per_source=3, max_total=3))
        routed_reader, routed_writer = await connect(port, source="127.0.0.2")
        routed_writer.write(FIRST_BYTES[Route.HTTP])
        assert await routed_reader.readline() == b"http\n"
        old_reader, old_writer = await connect(port, source="127.0.0.3")
        await until(lambda: server.limiter.total == 2)
        _, young_writer = await connect(port, source="127.0.0.4")
        await until(lambda: server.limiter.total == 3)
        with structlog.testing.capture_logs() as logs:
            new_reader, new_writer = await connect(port, source="127.0.0.5")
            assert await closed_by_server(old_reader)
            new_writer.write(FIRST_BYTES[Route.HTTP])
            assert await new_reader.readline() == b"http\n"
        routed_writer.write(b"still here")
        await routed_writer.drain()
        assert server.limiter.total == 3 and server.statistics()["rejected.evicted"] == 1
        for writer in (routed_writer, old_writer, young_writer, new_writer):
            writer.close()
        await until(lambda: server.limiter.total == 0)
        await server.close()
        return logs

    (event,) = rejections(run(body()))
    assert event["reason"].startswith("evicted: total cap 3")


def test_a_handed_off_connection_keeps_its_slot_until_the_adopter_closes_it() -> None:
    """Cross-thread hand-off: counted after the hand-off, released when the adopted transport is lost."""

    async def body() -> None:
        other = LoopThread("adopter")
        other.start()
        adopted: asyncio.Queue[HandedOff] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        server = AcceptorServer(AcceptorLimits(max_per_source=2, max_total=2))
        server.route_hand_off(Route.HTTP, lambda handed: loop.call_soon_threadsafe(adopted.put_nowait, handed))
        _, port = await server.start("127.0.0.1", 0)
        reader, writer = await connect(port)
        writer.write(FIRST_BYTES[Route.HTTP])
        handed = await adopted.get()
        assert handed.release is not None and server.limiter.total == 1
        other.call(adopt(handed, lambda: Collector(Route.HTTP, lambda r, b: None)), 5.0)
        assert await reader.readline() == b"http\n"
        assert server.limiter.total == 1  # the adopter holds it now
        writer.close()
        await until(lambda: server.limiter.total == 0)
        await server.close()
        other.stop()

    run(body())
