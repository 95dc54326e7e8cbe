"""Embedding villagemesh in an application: two nodes, plain threads first, then asyncio.

Run it:  .venv/bin/python docs/example.py
(tests/test_docs.py runs it too, so it stays true.)
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from pathlib import Path

from villagemesh import create_network
from villagemesh.protocols.envelope import Message


def with_threads(base: Path) -> None:
    """Blocking API: fine from any thread; handlers run in the node's gateway thread."""
    received = threading.Event()

    def on_data(message: Message) -> None:
        print(f"alice got {message.payload!r} from {message.sender[:8]}…")
        received.set()

    with create_network("hybrid", name="alice", data_dir=base / "alice") as alice:
        alice.subscribe("DATA", on_data)
        # bob knows where alice listens; discovery does the rest (and alice learns bob back).
        with create_network("hybrid", name="bob", data_dir=base / "bob", bootstrap=(alice.acceptor_address,)) as bob:
            if not bob.wait_for_peers(1, timeout=10):
                raise SystemExit("bob did not find alice")
            handle = bob.send(alice.node_id, b"hello from a thread", priority="high")
            status = handle.result(timeout=10)  # raises DeliveryFailed if it could not be delivered
            print(f"bob's message delivered after {status.attempts} attempt(s)")
            received.wait(10)
            print("bob knows:", [(p.peer_id[:8], p.capabilities.performance_tier) for p in bob.peers()])


async def with_asyncio(base: Path) -> None:
    """The same from asyncio: ``async with``, ``asend``, awaiting the handle, coroutine handlers."""
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_data(message: Message) -> None:
        await got.put(message.payload)

    async with create_network("mesh", name="carol", data_dir=base / "carol") as carol:
        carol.subscribe("DATA", on_data)  # runs on this event loop
        async with create_network(
            "mesh", name="dave", data_dir=base / "dave", bootstrap=(carol.acceptor_address,)
        ) as dave:
            while not await dave.apeers():
                await asyncio.sleep(0.05)
            handle = await dave.asend(carol.node_id, b"hello from asyncio")
            status = await handle
            print(f"dave's message: {status.state.value}; carol got {await asyncio.wait_for(got.get(), 10)!r}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        with_threads(Path(tmp))
        asyncio.run(with_asyncio(Path(tmp)))
