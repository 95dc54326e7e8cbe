"""Embedding villagemesh in an application: two nodes, plain threads first, then asyncio.

Run it:  .venv/bin/python docs/example.py
(tests/test_docs.py runs it, and type-checks it with ``mypy --strict``, so it stays true.)
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from pathlib import Path

from villagemesh import AsyncNode, InboundMessage, Priority, create_network
from villagemesh.errors import RemoteError, Unhandled


def with_threads(base: Path) -> None:
    """Blocking API: fine from any thread; plain handlers run in the node's gateway thread."""
    received = threading.Event()

    def on_data(message: InboundMessage) -> None:
        print(f"alice got {message.payload!r} from {message.sender[:8]}…")
        received.set()

    def on_request(message: InboundMessage) -> bytes:
        if not message.payload:
            raise ValueError("an empty question")
        return message.payload[::-1]  # the value a handler returns is the reply

    with create_network("hybrid", name="alice", data_dir=base / "alice") as alice:
        alice.subscribe("DATA", on_data)
        alice.subscribe("REQUEST", on_request)
        # bob knows where alice listens; discovery does the rest (and alice learns bob back).
        with create_network("hybrid", name="bob", data_dir=base / "bob", bootstrap=(alice.acceptor_address,)) as bob:
            if not bob.wait_for_peers(1, timeout=10):
                raise SystemExit("bob did not find alice")
            handle = bob.send(alice.node_id, b"hello from a thread", priority=Priority.HIGH)
            status = handle.result(timeout=10)  # raises if alice's handler did not take it
            print(f"bob's message delivered after {status.attempts} attempt(s): {status.state.value}")
            received.wait(10)
            print("bob asked, alice answered:", bob.request(alice.node_id, b"olleh", timeout=10))
            try:
                bob.request(alice.node_id, b"", timeout=10)
            except RemoteError as error:
                print(f"alice's handler raised {error.exc_type}: {error.exc_message}")
            try:
                bob.send(alice.node_id, b"?", kind="NOBODY").result(timeout=10)
            except Unhandled as error:
                print(f"unhandled at alice: kind {error.kind}")
            tiers = [p.capabilities.performance_tier for p in bob.peers() if p.capabilities is not None]
            print("bob knows peers of tiers:", tiers)


async def with_asyncio(base: Path) -> None:
    """The same from asyncio: AsyncNode, coroutine handlers on this loop, messages() as a stream."""
    carol_node = create_network("mesh", name="carol", data_dir=base / "carol")
    async with AsyncNode(carol_node) as carol:
        dave_node = create_network("mesh", name="dave", data_dir=base / "dave", bootstrap=(carol.acceptor_address,))
        async with AsyncNode(dave_node) as dave:
            stream = carol.messages("DATA")
            first = asyncio.ensure_future(anext(stream))  # subscribed once it starts waiting
            await asyncio.sleep(0)
            if not await dave.wait_for_peers(1, timeout=10):
                raise SystemExit("dave did not find carol")
            handle = await dave.send(carol.node_id, b"hello from asyncio")
            status = await handle
            message = await asyncio.wait_for(first, 10)
            print(f"dave's message: {status.state.value}; carol got {message.payload!r}")
            await stream.aclose()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        with_threads(Path(tmp))
        asyncio.run(with_asyncio(Path(tmp)))
