"""villagemesh: an actor-model runtime for peer-to-peer nodes.

The public face is small: :func:`create_network`, :class:`Node` and its asyncio
face :class:`AsyncNode`, the delivery handle and statuses, :class:`Priority`,
the errors (:mod:`villagemesh.errors`) and the replaced system's names
(:mod:`villagemesh.compat`). They are imported lazily (PEP 562) so that
``import villagemesh.protocols`` stays free of sockets, threads and ZeroMQ: the
protocols are sans-I/O and usable on their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "AsyncNode",
    "DeliveryHandle",
    "DeliveryState",
    "DeliveryStatus",
    "InboundMessage",
    "MessageId",
    "NetworkMode",
    "Node",
    "NodeConfig",
    "NodeEvent",
    "OutboxLimits",
    "PeerInfo",
    "Priority",
    "__version__",
    "create_network",
    "message_id_for",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from villagemesh.aio import AsyncNode
    from villagemesh.node import (
        DeliveryHandle,
        DeliveryState,
        DeliveryStatus,
        InboundMessage,
        MessageId,
        NetworkMode,
        Node,
        NodeConfig,
        NodeEvent,
        OutboxLimits,
        PeerInfo,
        Priority,
        create_network,
        message_id_for,
    )


def __getattr__(name: str) -> Any:
    if name == "AsyncNode":
        from villagemesh import aio

        return aio.AsyncNode
    if name in __all__ and name != "__version__":
        from villagemesh import node

        return getattr(node, name)
    raise AttributeError(f"module 'villagemesh' has no attribute {name!r}")
