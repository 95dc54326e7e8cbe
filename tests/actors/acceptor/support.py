"""Helpers shared by the acceptor, WebSocket and LAN tests: bounded asyncio runs and bus actors."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pykka

from villagemesh.actors.core.base import Actor, ActorContext
from villagemesh.actors.core.transport import ReceivedMany
from villagemesh.protocols.discovery import Capabilities

WAIT = 10.0
"""Upper bound for a wait in these tests: reached only when something hangs."""


def run(coro: Awaitable[Any], timeout: float = 15.0) -> Any:
    """Run one test body on a fresh event loop, bounded."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a state the code under test reaches on its own (its counters), bounded."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


class Sink(Actor):
    """Puts every bus message it gets into ``config["queue"]``; a ReceivedMany as each of its Received."""

    def handle(self, msg: Any) -> Any:
        for one in msg if isinstance(msg, ReceivedMany) else (msg,):
            self.ctx.config["queue"].put(one)


def start(env: Any, cls: type[Actor], name: str, **config: Any) -> pykka.ActorRef[Any]:
    """Open ``name``'s mailbox on the test node's bus and start ``cls`` on it."""
    env.bus.open_mailbox(name)
    return cls.start(ActorContext(bus=env.bus, name=name, log=env.log, scheduler=env.scheduler, config=config))


CAPS = Capabilities(
    cpu_cores=4,
    ram_mb=8192,
    battery_percent=None,
    network_type="wifi",
    device_type="laptop",
    performance_tier="high",
    evolution_capacity=0.7,
    available_for_evolution=True,
    transports=("websocket",),
)
"""A laptop's capabilities, for identities in discovery tests."""


def free_udp_port() -> int:
    """A UDP port nobody on this host uses now (tests never share the default beacon port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def fake_peer(answer: Callable[[bytes], bytes] | None = None) -> AsyncIterator[int]:
    """A loopback TCP peer (yields its port): silent, or answering its first read with ``answer(data)``.

    Every connection it accepted is closed on exit, so no transport outlives the test.
    """
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        if answer is None:
            await reader.read()
        else:
            writer.write(answer(await reader.read(64 * 1024)))
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()
