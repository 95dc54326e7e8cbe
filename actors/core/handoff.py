"""Handing a sniffed connection from one asyncio loop to another, without losing a byte.

The acceptor owns the node's one TCP port and sniffs each connection's first
bytes; the actor that owns the connection's :class:`Route` (the WebSocket
transport, the LAN responder, the libp2p transport next) takes it over on its
own loop. This module is that contract, shared by both sides::

    acceptor loop: pause reading, dup() the socket, abort the transport
        ──HandedOff(sock, peeked, peer, route)──▶ (across threads: ConnectionHandedOff on the bus)
    owner's loop:  adopt(handed, factory) ─▶ factory's protocol gets connection_made, then `peeked`

:func:`adopt` feeds the peeked bytes inside ``connection_made``, before the new
transport can read, so the byte order is the client's whatever the loops'
scheduling; bytes sent after the peek are still in the kernel's buffer.

Used by the acceptor (which makes hand-offs), :mod:`.loopactor` (which turns a
``ConnectionHandedOff`` back into a :class:`HandedOff`) and every transport
that serves a route. Nothing here touches the bus.
"""

from __future__ import annotations

import asyncio
import enum
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from villagemesh.errors import ConfigError, ConnectError

__all__ = ["HandedOff", "ProtocolFactory", "Route", "adopt", "feed", "peer_label"]


class Route(enum.Enum):
    """Where a sniffed connection goes; handlers are registered per route."""

    DISCOVERY = "discovery"
    SECURE = "secure"
    LIBP2P = "libp2p"
    HTTP = "http"
    TLS = "tls"


ProtocolFactory = Callable[[], asyncio.BaseProtocol]
"""Makes the protocol an in-loop route hands a connection to."""


@dataclass(frozen=True, slots=True)
class HandedOff:
    """A connection handed to another loop: adopt ``sock``, then feed ``peeked`` first.

    ``sock`` is a duplicate the receiver owns (close it if you do not adopt it).
    """

    sock: socket.socket
    peeked: bytes
    peer: str
    route: Route


def feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Deliver ``data`` to a protocol as if the transport had read it (plain or buffered)."""
    if not data:
        return
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buf = memoryview(protocol.get_buffer(len(view))).cast("B")
            n = min(len(buf), len(view))
            if n == 0:
                raise ConfigError(f"{type(protocol).__name__}.get_buffer returned an empty buffer")
            buf[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
    elif isinstance(protocol, asyncio.Protocol):
        protocol.data_received(data)
    else:
        raise ConfigError(f"{type(protocol).__name__} cannot receive stream data")


async def adopt(handed: HandedOff, factory: ProtocolFactory) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """On the adopting loop: take over a handed-off socket; the peeked bytes arrive first.

    The protocol from ``factory`` gets ``connection_made`` and then ``handed.peeked``
    in the same callback, before the transport can read anything newer, so the
    byte order is the client's whatever the loop's scheduling.
    Returns the transport and the protocol ``factory`` made.
    """
    inner = factory()
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await loop.connect_accepted_socket(lambda: _PeekedFirst(inner, handed.peeked), handed.sock)
    except OSError as exc:
        handed.sock.close()
        raise ConnectError(f"cannot adopt the connection from {handed.peer}: {exc}") from exc
    assert isinstance(transport, asyncio.Transport)
    return transport, inner


class _PeekedFirst(asyncio.Protocol):
    """Stands in only for ``connection_made``: installs the real protocol and feeds it the peek."""

    def __init__(self, inner: asyncio.BaseProtocol, peeked: bytes) -> None:
        self.inner = inner
        self.peeked = peeked

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.set_protocol(self.inner)
        self.inner.connection_made(transport)
        if not transport.is_closing():
            feed(self.inner, self.peeked)

    def connection_lost(self, exc: Exception | None) -> None:
        # Only reached if the transport failed before connection_made: the real protocol never started.
        return


def peer_label(peername: Any) -> tuple[str, str]:
    """``(source address, "host:port")`` for a transport's ``peername``."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host = str(peername[0])
        return host, f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"
    return "unknown", str(peername)
