"""The replaced system's names (AIVillage's P2P layer), kept where they make sense.

A program written against ``infrastructure.p2p`` ports by changing its import::

    from villagemesh.compat import P2PNetwork, NetworkConfig, MessagePriority, create_network

    network = create_network("hybrid", data_dir="/var/lib/agent")
    await network.start()
    network.config.transport_priority      # ['libp2p', 'bitchat', 'betanet', 'websocket']
    peers = await network.start_discovery()
    await network.send_to_peer(peer_id, {"type": "DATA", "data": ...})

:class:`P2PNetwork` is a thin asyncio wrapper around a :class:`~villagemesh.node.Node`
(``network.node``); the differences from the replaced API are listed in
``docs/migration.md``. A name that could not be kept raises ``AttributeError``
naming what replaces it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from villagemesh.actors.retrier.modes import TRANSPORT_ORDER, NetworkMode
from villagemesh.aio import AsyncNode
from villagemesh.errors import ConfigError
from villagemesh.node import DEFAULT_TTL, Handler, Node, NodeConfig, PeerInfo
from villagemesh.protocols.envelope import Message, Priority, UnifiedMessage

__all__ = [
    "Message",
    "MessagePriority",
    "NetworkConfig",
    "NetworkMode",
    "P2PNetwork",
    "PeerInfo",
    "UnifiedMessage",
    "create_network",
]

MessagePriority = Priority
"""The replaced system's six priority enums are this one (CRITICAL, HIGH, NORMAL, LOW, BULK)."""

_REPLACED: dict[str, str] = {
    "MessageDelivery": "Node.send (reliable by default; it returns a villagemesh.DeliveryHandle)",
    "DeliveryStatus": "villagemesh.DeliveryStatus (DeliveryHandle.status / await handle)",
    "TransportManager": "the network mode (NetworkConfig.mode) and its transport_priority",
    "BitChatTransport": "the BitChat transport actor (villagemesh.actors.bitchat; on with NodeConfig.bitchat_radio)",
    "BetaNetTransport": "the BetaNet actor (villagemesh.actors.betanet; the anonymous mode, NodeConfig.betanet)",
    "LibP2PTransport": "the libp2p transport actor (villagemesh.actors.libp2p; on by default, NodeConfig.libp2p)",
    "MeshProtocol": "villagemesh.node.Node (the node is the mesh; see docs/migration.md)",
    "send_message_to_peer": "P2PNetwork.send_to_peer",
}
"""Names of the replaced API that are not kept, and what to use instead."""


def __getattr__(name: str) -> Any:
    if name in _REPLACED:
        raise AttributeError(f"villagemesh.compat.{name} is not kept: use {_REPLACED[name]}")
    raise AttributeError(f"module 'villagemesh.compat' has no attribute {name!r}")


@dataclass(frozen=True)
class NetworkConfig:
    """The replaced ``NetworkConfig``: a mode, its ``transport_priority``, and node settings.

    ``transport_priority`` is the ordered list of transports. villagemesh orders
    transports by network mode: a list that is one mode's order selects that mode;
    any other order is a ConfigError naming the orders there are.
    """

    mode: NetworkMode | str = NetworkMode.HYBRID
    data_dir: Path | str | None = None
    transport_priority: Sequence[str] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    """Any other :class:`~villagemesh.node.NodeConfig` field (``name``, ``bootstrap``, ``port``...)."""

    def __post_init__(self) -> None:
        mode = NetworkMode.parse(self.mode)
        if self.transport_priority is not None:
            wanted = tuple(str(t) for t in self.transport_priority)
            matching = [m for m, order in TRANSPORT_ORDER.items() if tuple(order) == wanted]
            if not matching:
                orders = {m.value: [str(t) for t in o] for m, o in TRANSPORT_ORDER.items()}
                raise ConfigError(f"transport_priority {list(wanted)} is no mode's order; the orders are {orders}")
            if self.mode != NetworkMode.HYBRID and matching[0] is not mode:
                chosen = matching[0].value
                raise ConfigError(f"transport_priority {list(wanted)} is mode {chosen}'s, not {mode.value}'s")
            mode = matching[0]
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "transport_priority", [str(t) for t in TRANSPORT_ORDER[mode]])

    def node_config(self) -> NodeConfig:
        """The villagemesh configuration this stands for."""
        if self.data_dir is None:
            raise ConfigError("NetworkConfig needs data_dir= (where the node keeps its key, peers and messages)")
        return NodeConfig(data_dir=Path(self.data_dir), mode=NetworkMode.parse(self.mode), **self.settings)


class P2PNetwork:
    """The replaced ``P2PNetwork``: every call a coroutine, on a villagemesh node."""

    def __init__(self, config: NetworkConfig) -> None:
        self.config = config
        self.node = Node(config.node_config())
        self.aio = AsyncNode(self.node)

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self.node.node_id

    async def start(self) -> P2PNetwork:
        """Start the node."""
        await self.aio.start()
        return self

    async def stop(self) -> None:
        """Stop the node."""
        await self.aio.stop()

    shutdown = stop

    async def __aenter__(self) -> P2PNetwork:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start_discovery(self, timeout: float | None = None) -> list[PeerInfo]:
        """Run a discovery round on every transport now; the peers known once it had time to answer.

        The replaced method returned ``asyncio.gather(..., return_exceptions=True)``'s
        list; a transport's discovery failure is logged by the node (``discovery_round``).
        """
        self.aio.discover_now()
        wait = self.node.config.discovery_timeout if timeout is None else timeout
        await self.aio.wait_for_peers(len(await self.aio.peers()) + 1, wait)
        return await self.aio.peers()

    async def get_peers(self) -> list[PeerInfo]:
        """Every known peer."""
        return await self.aio.peers()

    list_peers = get_peers

    async def send_to_peer(self, peer_id: str, message: Message | bytes | dict[str, Any] | str) -> bool:
        """Send reliably and wait for the end; True once the peer's handler took it.

        ``message`` is a :class:`UnifiedMessage` (its kind, priority, TTL and payload are used),
        bytes (kind DATA), or a JSON value (a dict's ``"type"`` is the kind).
        """
        kind, payload, priority, ttl = _parts(message)
        handle = await self.aio.send(peer_id, payload, kind=kind, priority=priority, ttl=ttl)
        status = await handle
        return status.delivered

    send_message = send_to_peer

    async def broadcast_to_peers(self, message_type: str, data: bytes | dict[str, Any] | str) -> int:
        """Send ``data`` as ``message_type`` to every known peer; how many took it."""
        payload = data if isinstance(data, bytes) else json.dumps(data).encode()
        handles = await self.aio.broadcast(message_type, payload)
        return sum([(await handle).delivered for handle in handles])

    def register_handler(self, message_type: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler(message)`` for each message of ``message_type``; returns the unsubscribe."""
        return self.aio.subscribe(message_type, handler)

    async def get_network_status(self) -> dict[str, Any]:
        """The node at a glance (``transport_priority`` included)."""
        return await self.aio.network_status()

    async def get_suitable_evolution_peers(self, min_count: int = 1) -> list[PeerInfo]:
        """Every peer suitable for evolution, best first (no cap)."""
        return await self.aio.get_suitable_evolution_peers(min_count)


def create_network(mode: NetworkMode | str = NetworkMode.HYBRID, **settings: Any) -> P2PNetwork:
    """The replaced ``create_network(mode)``: a :class:`P2PNetwork` (``data_dir=`` required).

    ``transport_priority=[...]`` may be given as a setting (see :class:`NetworkConfig`).
    """
    data_dir = settings.pop("data_dir", None)
    priority = settings.pop("transport_priority", None)
    return P2PNetwork(NetworkConfig(mode, data_dir, priority, settings))


def _parts(message: Message | bytes | dict[str, Any] | str) -> tuple[str, bytes, Priority, float]:
    if isinstance(message, Message):
        return message.kind, message.payload, message.priority, message.ttl
    if isinstance(message, bytes | bytearray):
        return "DATA", bytes(message), Priority.NORMAL, DEFAULT_TTL
    if isinstance(message, dict):
        kind = str(message.get("type", "DATA"))
        return kind, json.dumps(message).encode(), Priority.NORMAL, DEFAULT_TTL
    if isinstance(message, str):
        return "DATA", message.encode(), Priority.NORMAL, DEFAULT_TTL
    raise ConfigError(f"send_to_peer takes a UnifiedMessage, bytes, a dict or a str, got {type(message).__name__}")
