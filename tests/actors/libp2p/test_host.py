"""The libp2p host's streams on one loop: frames, credit and many streams, two hosts over real TCP."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from tests.actors.acceptor.support import run
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.libp2p.host import Libp2pHost, Libp2pStream
from villagemesh.actors.libp2p.state import listen_multiaddr
from villagemesh.errors import RemoteProtocolError
from villagemesh.protocols.envelope import Message, Priority, encode_message
from villagemesh.protocols.libp2p.varint import frame

FRAMES = "/test/frames/1.0.0"


@asynccontextmanager
async def listening() -> AsyncIterator[Libp2pHost]:
    """A host behind a TCP server of its own on 127.0.0.1."""
    holder: list[Libp2pHost] = []
    server = await asyncio.get_running_loop().create_server(lambda: holder[0].protocol_factory(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    host = Libp2pHost(NodeKeys.generate(), lambda m, raw, node_id: None, listen=listen_multiaddr("127.0.0.1", port))
    holder.append(host)
    try:
        yield host
    finally:
        await host.close()
        server.close()
        await server.wait_closed()


def test_frames_past_several_windows_on_one_stream_arrive_whole_and_in_order() -> None:
    """3 MiB of frames on one stream (three windows): every byte read is credited once, nothing stalls."""
    sizes = [1 + (n * 7919) % 4000 for n in range(1500)]
    sent = [os.urandom(size) for size in sizes]

    async def body() -> list[bytes]:
        got: list[bytes] = []
        done = asyncio.Event()

        async def serve(stream: Libp2pStream) -> None:
            while await stream.more():
                got.append(await stream.read_frame(4096))
            done.set()

        async with listening() as server:
            server.handlers[FRAMES] = serve
            client = Libp2pHost(NodeKeys.generate(), lambda m, raw, node_id: None)
            try:
                stream = await client.open_stream(server.address, FRAMES)
                for chunk in range(0, len(sent), 100):
                    await stream.write(b"".join(frame(p) for p in sent[chunk : chunk + 100]))
                stream.close()
                await asyncio.wait_for(done.wait(), 20)
            finally:
                await client.close()
        return got

    assert run(body(), 30) == sent


def test_a_frame_announced_above_the_limit_is_a_remote_protocol_error() -> None:
    async def body() -> BaseException | None:
        failure: list[BaseException] = []
        failed = asyncio.Event()

        async def serve(stream: Libp2pStream) -> None:
            try:
                await stream.read_frame(16)
            except RemoteProtocolError as exc:
                failure.append(exc)
                failed.set()
                raise

        async with listening() as server:
            server.handlers[FRAMES] = serve
            client = Libp2pHost(NodeKeys.generate(), lambda m, raw, node_id: None)
            try:
                stream = await client.open_stream(server.address, FRAMES)
                await stream.write(frame(bytes(17)))
                await asyncio.wait_for(failed.wait(), 10)
            finally:
                await client.close()
        return failure[0] if failure else None

    error = run(body(), 20)
    assert isinstance(error, RemoteProtocolError) and "17 bytes is above the 16" in str(error)


def test_envelopes_go_out_at_once_on_an_open_connection_with_room_and_wait_otherwise() -> None:
    """send_now sends from a plain loop callback only when nothing would make send_many wait: a
    connection up to that node, its envelope stream agreed, room in the socket; else it sends nothing."""

    async def body() -> tuple[list[bytes], list[bool]]:
        got: list[bytes] = []
        arrived = asyncio.Event()
        said: list[bool] = []

        def on_message(message: Message, raw: bytes, node_id: str) -> None:
            got.append(message.payload)
            arrived.set()

        async def until(count: int) -> None:
            while len(got) < count:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 20)

        async with listening() as server:
            server.on_message = on_message
            server_id = server.keys.node_id
            keys = NodeKeys.generate()
            client = Libp2pHost(keys, lambda m, raw, node_id: None)

            def envelopes(*payloads: bytes) -> list[bytes]:
                return [
                    encode_message(
                        Message(os.urandom(16), "DATA", keys.node_id, server_id, Priority.NORMAL, 0.0, 1e12, None, p)
                    )
                    for p in payloads
                ]

            try:
                said.append(client.send_now(server.address, server_id, envelopes(b"never")))  # not connected
                await client.send_many(server.address, server_id, envelopes(b"first"))  # dials, opens the stream
                await until(1)
                said.append(client.send_now(server.address, server_id, envelopes(b"second", b"third")))
                said.append(
                    client.send_now("/ip4/127.0.0.1/tcp/1/p2p/" + str(server.peer_id), server_id, envelopes(b"x"))
                )
                conn = client.peers[server_id]
                conn._writable.clear()  # as asyncio's pause_writing does when the socket's buffer is full
                said.append(client.send_now(server.address, server_id, envelopes(b"full")))
                conn._writable.set()
                said.append(client.send_now("", server_id, envelopes(b"fourth")))  # "": whichever connection is up
                await until(4)
            finally:
                await client.close()
        return got, said

    got, said = run(body(), 30)
    assert said == [False, True, False, False, True]
    assert got == [b"first", b"second", b"third", b"fourth"]
