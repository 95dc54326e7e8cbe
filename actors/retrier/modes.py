"""Network modes and the transport order each one tries, first to last.

The order is the replaced system's (its users know it): a message goes out on
the first transport of its mode's order that the recipient is reachable on,
and fails over along the order::

    HYBRID     libp2p  → bitchat → betanet  → websocket
    MESH       bitchat → libp2p  → websocket → betanet
    ANONYMOUS  betanet → libp2p  → bitchat  → websocket
    DIRECT     libp2p  → websocket → bitchat → betanet

Transport names are plain strings (:class:`Transport` is a ``StrEnum``, so
``Transport.LIBP2P == "libp2p"``): a peer record may name a transport that no
mode lists (a LAN transport, say); :func:`transport_order` puts such transports
after the listed ones, in name order, so they are still used, but last.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from villagemesh.errors import ConfigError

__all__ = ["TRANSPORT_ORDER", "NetworkMode", "Transport", "next_transport", "transport_order"]


class NetworkMode(enum.StrEnum):
    """How a node prefers to reach its peers (``create_network(mode)``)."""

    HYBRID = "hybrid"
    MESH = "mesh"
    ANONYMOUS = "anonymous"
    DIRECT = "direct"

    @classmethod
    def parse(cls, value: str | NetworkMode) -> NetworkMode:
        """The mode named ``value`` (case-insensitive); :class:`ConfigError` naming it otherwise."""
        try:
            return cls(value.lower() if isinstance(value, str) else value)
        except (ValueError, AttributeError):
            names = ", ".join(m.value for m in cls)
            raise ConfigError(f"unknown network mode {value!r}; expected one of {names}") from None


class Transport(enum.StrEnum):
    """The transports the network modes order."""

    LIBP2P = "libp2p"
    BITCHAT = "bitchat"
    BETANET = "betanet"
    WEBSOCKET = "websocket"


_T = Transport
TRANSPORT_ORDER: Mapping[NetworkMode, tuple[Transport, ...]] = MappingProxyType(
    {
        NetworkMode.HYBRID: (_T.LIBP2P, _T.BITCHAT, _T.BETANET, _T.WEBSOCKET),
        NetworkMode.MESH: (_T.BITCHAT, _T.LIBP2P, _T.WEBSOCKET, _T.BETANET),
        NetworkMode.ANONYMOUS: (_T.BETANET, _T.LIBP2P, _T.BITCHAT, _T.WEBSOCKET),
        NetworkMode.DIRECT: (_T.LIBP2P, _T.WEBSOCKET, _T.BITCHAT, _T.BETANET),
    }
)
"""Per mode, every transport, most preferred first (read-only)."""


def transport_order(mode: NetworkMode, available: Iterable[str]) -> tuple[str, ...]:
    """The transports in ``available`` in the order ``mode`` tries them.

    Listed transports come in the mode's order; transports the mode does not
    list follow, sorted by name. Duplicates in ``available`` count once.
    """
    if isinstance(available, tuple):
        return _order(mode, available)  # a route's transports: the same few tuples, every message
    return _order.__wrapped__(mode, tuple(available))


@functools.lru_cache(maxsize=1024)
def _order(mode: NetworkMode, available: tuple[str, ...]) -> tuple[str, ...]:
    have = set(available)
    listed = tuple(str(t) for t in TRANSPORT_ORDER[mode] if t in have)
    extra = tuple(sorted(have.difference(listed)))
    return listed + extra


def next_transport(mode: NetworkMode, available: Iterable[str], failed: Iterable[str]) -> str | None:
    """The transport to try next: the first in ``mode``'s order not in ``failed``.

    ``failed`` is the set of transports that failed in the current round. When
    every available transport has failed, the round starts over at the most
    preferred one (a transport that was down may be back). ``None`` only when
    the recipient has no transport at all.
    """
    order = transport_order(mode, available)
    if not order:
        return None
    if not failed:
        return order[0]
    done = set(failed)
    for transport in order:
        if transport not in done:
            return transport
    return order[0]
