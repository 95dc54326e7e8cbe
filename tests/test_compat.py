"""villagemesh.compat: the replaced system's names behave as its users know them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WAIT
from villagemesh import compat
from villagemesh.compat import MessagePriority, NetworkConfig, P2PNetwork, UnifiedMessage, create_network
from villagemesh.errors import ConfigError
from villagemesh.protocols.envelope import Message, Priority

pytestmark = pytest.mark.slow


def test_the_message_names_are_the_envelope_and_its_one_priority_enum() -> None:
    assert UnifiedMessage is Message and MessagePriority is Priority and compat.Message is Message


def test_transport_priority_is_the_modes_order_and_as_a_setting_selects_the_mode(tmp_path: Path) -> None:
    assert NetworkConfig("mesh", tmp_path).transport_priority == ["bitchat", "libp2p", "websocket", "betanet"]
    chosen = NetworkConfig(data_dir=tmp_path, transport_priority=["libp2p", "websocket", "bitchat", "betanet"])
    assert chosen.mode == "direct"
    with pytest.raises(ConfigError, match="no mode's order"):
        NetworkConfig(data_dir=tmp_path, transport_priority=["websocket"])
    with pytest.raises(ConfigError, match="mode direct's, not mesh's"):
        NetworkConfig("mesh", tmp_path, ["libp2p", "websocket", "bitchat", "betanet"])
    with pytest.raises(ConfigError, match="data_dir"):
        create_network("hybrid")


def test_names_that_are_not_kept_raise_attribute_error_naming_the_replacement() -> None:
    with pytest.raises(AttributeError, match=r"Node\.send"):
        compat.MessageDelivery  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'Nonsense'"):
        compat.Nonsense  # noqa: B018


def test_two_networks_discover_send_broadcast_and_report_as_the_replaced_api_did(tmp_path: Path) -> None:
    async def main() -> None:
        async with create_network("hybrid", data_dir=tmp_path / "a", name="a", lan=False) as a:
            settings: dict[str, Any] = {"name": "b", "lan": False, "bootstrap": (a.node.acceptor_address,)}
            async with P2PNetwork(NetworkConfig("hybrid", tmp_path / "b", settings=settings)) as b:
                got: asyncio.Queue[Any] = asyncio.Queue()

                async def on_task(message: Any) -> None:
                    await got.put(json.loads(message.payload))

                a.register_handler("EVOLUTION_START", on_task)
                peers = await b.start_discovery(timeout=WAIT)
                assert a.node_id in [p.peer_id for p in peers] and await b.get_peers() == await b.list_peers()
                assert await b.send_to_peer(a.node_id, {"type": "EVOLUTION_START", "data": 1})
                assert (await asyncio.wait_for(got.get(), WAIT))["data"] == 1
                assert not await b.send_message(a.node_id, b"nobody handles DATA")
                envelope = Message(b"\0" * 16, "EVOLUTION_START", "x", None, Priority.HIGH, 0.0, 60.0, None, b"[2]")
                assert await b.send_to_peer(a.node_id, envelope)
                assert await asyncio.wait_for(got.get(), WAIT) == [2]
                assert await b.broadcast_to_peers("EVOLUTION_START", {"data": 3}) == 1
                status = await b.get_network_status()
                assert status["transport_priority"] == b.config.transport_priority
                assert isinstance(await b.get_suitable_evolution_peers(1), list)
                with pytest.raises(ConfigError, match="UnifiedMessage, bytes"):
                    await b.send_to_peer(a.node_id, 5)  # type: ignore[arg-type]

    asyncio.run(main())
