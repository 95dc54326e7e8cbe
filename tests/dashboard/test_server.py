"""The dashboard server's bounds: a browser that reads too slowly is dropped, not queued for."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from villagemesh.dashboard.server import SUBSCRIBER_QUEUE, Dashboard
from villagemesh.dashboard.sources import Sources
from villagemesh.dashboard.status import node_status
from villagemesh.errors import VillageMeshError
from villagemesh.node import create_network


def test_a_subscriber_that_falls_behind_is_ended_and_forgotten(tmp_path: Path) -> None:
    async def scenario() -> None:
        dashboard = Dashboard(Sources([tmp_path / "none.jsonl"]))
        slow: asyncio.Queue[bytes | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        dashboard._subscribers.add(slow)
        for i in range(SUBSCRIBER_QUEUE + 1):
            dashboard._broadcast(f"{i}".encode())
        assert slow not in dashboard._subscribers
        items = [slow.get_nowait() for _ in range(slow.qsize())]
        assert items[-1] is None and len(items) == SUBSCRIBER_QUEUE  # ends its stream

    asyncio.run(scenario())


def test_a_stopped_node_has_no_status(tmp_path: Path) -> None:
    node = create_network("hybrid", data_dir=tmp_path / "a")
    with pytest.raises(VillageMeshError, match="not running"):
        node_status(node)
