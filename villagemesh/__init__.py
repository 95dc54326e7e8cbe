"""villagemesh: an actor-model runtime for peer-to-peer nodes.

The public face is small: :func:`create_network` and :class:`Node`. They are
imported lazily (PEP 562) so that ``import villagemesh.protocols`` stays free of
sockets, threads and ZeroMQ: the protocols are sans-I/O and usable on their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["NetworkMode", "Node", "__version__", "create_network"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from villagemesh.node import NetworkMode, Node, create_network


def __getattr__(name: str) -> Any:
    if name in {"Node", "NetworkMode", "create_network"}:
        from villagemesh import node

        return getattr(node, name)
    raise AttributeError(f"module 'villagemesh' has no attribute {name!r}")
