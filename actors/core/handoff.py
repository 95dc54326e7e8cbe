"""Handing a sniffed connection from one asyncio loop to another, without losing a byte.

The acceptor owns the node's one TCP port and sniffs each connection's first
bytes; the actor that owns the connection's :class:`Route` (the WebSocket
transport, the LAN responder, the libp2p transport) takes it over on its
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

**One count of every connection, whoever owns it.** The node's
:class:`ConnectionLimiter` (a total cap and a per-source cap) counts a
connection from its accept until it closes: the acceptor takes the slot, the
slot travels with the hand-off (:attr:`HandedOff.release`; across the bus the
descriptor is the key, see :func:`hold` and :func:`claim`), and the adopted
transport gives it back when it is lost. A flood from many sources therefore
cannot hold more than the total cap, however many loops it is spread over.

**A deadline on every handshake.** :func:`adopt` aborts a connection whose
first complete message (:func:`handshake_done`: an HTTP request's headers, a
discovery or secure-channel frame, a TLS record, a multistream line) has not
arrived within ``deadline_s`` of its adoption: a client sending half a header
(slowloris) holds its slot for at most the acceptor's sniff timeout plus that.

**Refusals are counted, not each written.** :class:`RefusalLog` writes the
first few refusals of an interval in full (``connection_rejected``) and then
one ``connections_refused`` line per interval with the counts, so a flood of
refusals costs a line a second, not a line a connection.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from villagemesh.errors import ConfigError, ConnectError

__all__ = [
    "HANDSHAKE_DEADLINE_S",
    "ConnectionLimiter",
    "HandedOff",
    "ProtocolFactory",
    "RefusalLog",
    "RefusalTally",
    "Route",
    "adopt",
    "claim",
    "feed",
    "handshake_done",
    "hold",
    "peer_label",
]

HANDSHAKE_DEADLINE_S = 10.0
"""Seconds an adopted connection has for its first complete message (every protocol we speak
sends it at once; 10 s covers a slow radio link and a loaded node)."""

MAX_HEADER_BYTES = 16 * 1024
"""An HTTP request whose headers are not complete within this many bytes is not a handshake."""

REFUSAL_INTERVAL_S = 1.0
"""Refusals are summed up over this interval into one ``connections_refused`` line."""

REFUSALS_IN_FULL = 10
"""Refusals per interval written in full (``connection_rejected``) before they are only counted."""


class Route(enum.Enum):
    """Where a sniffed connection goes; handlers are registered per route."""

    DISCOVERY = "discovery"
    SECURE = "secure"
    LIBP2P = "libp2p"
    HTTP = "http"
    TLS = "tls"


ProtocolFactory = Callable[[], asyncio.BaseProtocol]
"""Makes the protocol an in-loop route hands a connection to."""


class ConnectionLimiter:
    """Counts open connections per source address and in total, against caps; thread-safe.

    ``try_open(src)`` admits a connection (and counts it) or refuses it;
    ``close(src)`` releases one. Invariants: ``total == sum(per-source)``,
    no count goes above its cap, no count goes below zero, and a source with
    no connections is forgotten (memory stays bounded by ``max_total``).
    One per node: the acceptor counts on its loop, adopting loops release on theirs.
    """

    def __init__(self, max_per_source: int, max_total: int) -> None:
        if max_per_source < 1 or max_total < 1:
            raise ConfigError(f"caps must be >= 1, got per-source {max_per_source!r}, total {max_total!r}")
        self.max_per_source = max_per_source
        self.max_total = max_total
        self._open: Counter[str] = Counter()
        self._total = 0
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        """Connections counted now, all sources together."""
        return self._total

    def count(self, src: str) -> int:
        """Connections counted now for ``src``."""
        return self._open.get(src, 0)

    def refusal(self, src: str) -> str | None:
        """Why ``try_open(src)`` would refuse now, or ``None`` if it would admit."""
        if self._total >= self.max_total:
            return f"total cap {self.max_total} reached"
        if self._open.get(src, 0) >= self.max_per_source:
            return f"per-source cap {self.max_per_source} reached for {src}"
        return None

    def try_open(self, src: str) -> bool:
        """Count a new connection from ``src``; False (and nothing counted) when a cap is hit."""
        with self._lock:
            n = self._open.get(src, 0)
            if self._total >= self.max_total or n >= self.max_per_source:
                return False
            self._open[src] = n + 1
            self._total += 1
            return True

    def close(self, src: str) -> None:
        """Release one connection of ``src``; releasing one never opened is a bug (ConfigError)."""
        with self._lock:
            n = self._open.get(src, 0)
            if n <= 0:
                raise ConfigError(f"close({src!r}) without a matching try_open")
            if n == 1:
                del self._open[src]
            else:
                self._open[src] = n - 1
            self._total -= 1

    def slot(self, src: str) -> Callable[[], None]:
        """A release of one counted connection of ``src`` that acts once however often it is called."""
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                self.close(src)

        return release


@dataclass(frozen=True, slots=True)
class HandedOff:
    """A connection handed to another loop: adopt ``sock``, then feed ``peeked`` first.

    ``sock`` is a duplicate the receiver owns (close it if you do not adopt it).
    ``release`` gives the connection's slot back to the node's limiter (called once
    it is closed; :func:`adopt` does it); None when nothing counts it.
    """

    sock: socket.socket
    peeked: bytes
    peer: str
    route: Route
    release: Callable[[], None] | None = None


_HELD: dict[int, Callable[[], None]] = {}
"""Slots of descriptors on their way across the bus, by descriptor (unique while it is open)."""
_HELD_LOCK = threading.Lock()


def hold(fd: int, release: Callable[[], None] | None) -> None:
    """Keep ``fd``'s slot while a ``ConnectionHandedOff`` carries it to its owner (see :func:`claim`)."""
    if release is not None:
        with _HELD_LOCK:
            _HELD[fd] = release


def claim(fd: int) -> Callable[[], None] | None:
    """The owner's side of :func:`hold`: the slot of ``fd`` (None if nothing held it), now the owner's."""
    with _HELD_LOCK:
        return _HELD.pop(fd, None)


def handshake_done(route: Route, data: bytes) -> bool | None:
    """Has ``data`` (a connection's first bytes) completed its first message? None: it never will.

    The rule per route: HTTP, the request's headers (a blank line, within
    :data:`MAX_HEADER_BYTES`); discovery, one frame (4-byte length); secure,
    the channel header and the first handshake frame (2-byte length); TLS, one
    record; libp2p, one multistream line.
    """
    if route is Route.HTTP:
        if b"\r\n\r\n" in data:
            return True
        return None if len(data) > MAX_HEADER_BYTES else False
    if route is Route.DISCOVERY:
        return len(data) >= 4 and len(data) >= 4 + int.from_bytes(data[:4], "big")
    if route is Route.SECURE:  # the channel header (magic, version), then a frame with a 2-byte length
        return len(data) >= 7 and len(data) >= 7 + int.from_bytes(data[5:7], "big")
    if route is Route.TLS:
        return len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big")
    return b"\n" in data  # LIBP2P: "/multistream/1.0.0\n" after its varint length


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


async def adopt(
    handed: HandedOff,
    factory: ProtocolFactory,
    *,
    deadline_s: float | None = None,
    on_late: Callable[[HandedOff, str], None] | None = None,
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """On the adopting loop: take over a handed-off socket; the peeked bytes arrive first.

    The protocol from ``factory`` gets ``connection_made`` and then ``handed.peeked``
    in the same callback, before the transport can read anything newer, so the
    byte order is the client's whatever the loop's scheduling.
    Returns the transport and the protocol ``factory`` made.

    With ``handed.release`` or ``deadline_s``, a thin forwarder stays the transport's
    protocol: it gives the slot back when the connection is lost, and aborts the
    connection (telling ``on_late`` why) if its first complete message
    (:func:`handshake_done`) has not arrived within ``deadline_s``.
    """
    inner = factory()
    loop = asyncio.get_running_loop()
    if handed.release is None and deadline_s is None:
        make: Callable[[], asyncio.BaseProtocol] = lambda: _PeekedFirst(inner, handed.peeked)  # noqa: E731
    else:
        make = lambda: _Adopted(inner, handed, deadline_s, on_late)  # noqa: E731
    try:
        transport, _ = await loop.connect_accepted_socket(make, handed.sock)
    except OSError as exc:
        handed.sock.close()
        if handed.release is not None:
            handed.release()
        raise ConnectError(f"cannot adopt the connection from {handed.peer}: {exc}") from exc
    assert isinstance(transport, asyncio.Transport)
    return transport, inner


class _Adopted(asyncio.Protocol):
    """Forwards everything to the real protocol; releases the slot on close; enforces the deadline."""

    __slots__ = ("handed", "inner", "late", "on_late", "seen", "timer", "transport")

    def __init__(
        self,
        inner: asyncio.BaseProtocol,
        handed: HandedOff,
        deadline_s: float | None,
        on_late: Callable[[HandedOff, str], None] | None,
    ) -> None:
        self.inner = inner
        self.handed = handed
        self.on_late = on_late
        self.late = deadline_s
        self.seen: bytes | None = b"" if deadline_s is not None else None
        """The first bytes until the handshake is complete; None once it is (or with no deadline)."""
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.late is not None:
            self.timer = asyncio.get_running_loop().call_later(self.late, self._expired)
        self.inner.connection_made(transport)
        if not transport.is_closing():
            self.data_received(self.handed.peeked)

    def data_received(self, data: bytes) -> None:
        if not data:
            return
        seen = self.seen
        if seen is not None:
            seen += data
            done = handshake_done(self.handed.route, seen)
            if done is None:
                self._refuse(f"no complete {self.handed.route.value} handshake within {len(seen)} bytes")
                return
            if done:
                self.seen = None
                if self.timer is not None:
                    self.timer.cancel()
            else:
                self.seen = seen
        feed(self.inner, data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        try:
            self.inner.connection_lost(exc)
        finally:
            if self.handed.release is not None:
                self.handed.release()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _expired(self) -> None:
        if self.seen is not None:
            self._refuse(f"no complete {self.handed.route.value} handshake within {self.late} s")

    def _refuse(self, reason: str) -> None:
        self.seen = None
        if self.on_late is not None:
            self.on_late(self.handed, reason)
        assert self.transport is not None
        self.transport.abort()


class RefusalTally:
    """Pure bookkeeping of refused connections over one interval (see :class:`RefusalLog`)."""

    def __init__(self, in_full: int = REFUSALS_IN_FULL) -> None:
        self.in_full = in_full
        self._kinds: Counter[str] = Counter()
        self._sources: Counter[str] = Counter()
        self._written = 0

    def note(self, kind: str, src: str) -> bool:
        """Count one refusal; True if it should be written in full (the first few of the interval)."""
        self._kinds[kind] += 1
        self._sources[src] += 1
        if self._written < self.in_full:
            self._written += 1
            return True
        return False

    @property
    def pending(self) -> bool:
        """Something was counted since the last :meth:`take`."""
        return bool(self._kinds)

    def take(self) -> dict[str, Any] | None:
        """The interval's summary (None if nothing beyond the refusals written in full), and a new interval."""
        total = sum(self._kinds.values())
        summary = None
        if total > self._written:
            summary = {
                "count": total,
                "written_in_full": self._written,
                "by_kind": dict(self._kinds),
                "sources": len(self._sources),
                "top_sources": dict(self._sources.most_common(5)),
            }
        self._kinds.clear()
        self._sources.clear()
        self._written = 0
        return summary


class RefusalLog:
    """Refusals on one loop: the first few per interval in full, then one summary line per interval.

    Call :meth:`refuse` on the loop's thread; the summary is written by a timer on that loop.
    """

    def __init__(self, log: Any, *, interval_s: float = REFUSAL_INTERVAL_S, in_full: int = REFUSALS_IN_FULL) -> None:
        self.log = log
        self.interval_s = interval_s
        self.tally = RefusalTally(in_full)
        self._timer: asyncio.TimerHandle | None = None

    def refuse(self, kind: str, src: str, **fields: Any) -> None:
        """Count one refusal of ``kind`` from ``src``; ``fields`` are ``connection_rejected``'s."""
        if not self.tally.pending:
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._summarize)
        if self.tally.note(kind, src):
            self.log.warning("connection_rejected", **fields)

    def _summarize(self) -> None:
        self._timer = None
        summary = self.tally.take()
        if summary is not None:
            self.log.warning("connections_refused", interval_s=self.interval_s, **summary)

    def close(self) -> None:
        """Write what is counted now and stop the timer (the loop is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._summarize()


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
