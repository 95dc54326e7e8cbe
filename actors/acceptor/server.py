"""The sniffing acceptor: one TCP port, every protocol, not one byte lost.

Each accepted connection gets a :class:`_SniffingProtocol`, an asyncio
``BufferedProtocol`` whose buffer is exactly ``MAX_SNIFF_BYTES`` long: the
transport reads *into* it, so before a verdict the acceptor holds at most that
many bytes and the rest waits in the kernel. On every arrival it asks
:func:`~villagemesh.protocols.sniff.sniff` about the whole buffer and looks the
verdict up in :data:`~.state.ROUTES`::

    accept ─▶ limiter.try_open(src) ──no──▶ reject "per-source cap ..." / "total cap ..."
                   │yes
                   ▼
             UNDECIDED ──bytes──▶ sniff(buffer) ──NEED_MORE──▶ (wait; timer runs)
                   │                   │
          timer / EOF                  ├─ UNKNOWN, full buffer, route without handler ─▶ reject
                   ▼                   ▼
                reject            hand-off (in-loop or cross-thread)

Two hand-off modes (a route has one handler, registered with one of them):

**in-loop** (:meth:`AcceptorServer.route_in_loop`): for protocols served on the
acceptor's own loop (aiohttp's ``RequestHandler`` is one). The transport is
switched to the handler's protocol, which gets ``connection_made(transport)``
and then every peeked byte, in order, before anything newer. Its connection
keeps counting against the source's cap until it closes.

**cross-thread** (:meth:`AcceptorServer.route_hand_off`): for protocols owned by
another actor's loop. Reading is paused, the socket is ``dup()``-ed, and the
transport is *aborted*: asyncio closes its descriptor after unregistering it
from its selector, and ``close()`` on one of two descriptors of a socket sends
nothing (no FIN, no RST: that happens only when the last descriptor goes, and
only ``shutdown()`` would act earlier; the acceptor never calls it). The
callback receives a :class:`HandedOff` with the duplicate socket, the peeked
bytes and the peer; the adopting loop calls
``loop.connect_accepted_socket(factory, handed.sock)`` and feeds
``handed.peeked`` to its protocol first. Bytes the client sent after the peek
are still in the kernel's buffer and arrive on the new loop in order. The
callback runs on the acceptor's loop and must only pass the value on
(``call_soon_threadsafe``, a queue); if it raises, the socket is closed and the
failure logged as a rejection.

Log events (structlog, fixed keys):
``connection_accepted`` (peer), ``connection_routed`` (peer, route, protocol,
peeked_bytes, mode), ``connection_rejected`` (peer, reason, protocol,
peeked_bytes).
"""

from __future__ import annotations

import asyncio
import enum
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from villagemesh.actors.acceptor.state import (
    AcceptorLimits,
    ConnectionLimiter,
    Reject,
    Route,
    route_for,
)
from villagemesh.errors import ConfigError, ConnectError
from villagemesh.protocols.sniff import MAX_SNIFF_BYTES, Sniffed, sniff

__all__ = ["AcceptorServer", "HandOff", "HandedOff", "ProtocolFactory", "feed"]

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


HandOff = Callable[[HandedOff], None]
"""Receives cross-thread hand-offs, on the acceptor's loop; must return at once."""


def feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Deliver ``data`` to a protocol as if the transport had read it (plain or buffered)."""
    if not data:
        return
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buf = protocol.get_buffer(len(view))
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


def peer_label(peername: Any) -> tuple[str, str]:
    """``(source address, "host:port")`` for a transport's ``peername``."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host = str(peername[0])
        return host, f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"
    return "unknown", str(peername)


class _Phase(enum.Enum):
    UNDECIDED = "undecided"
    IN_LOOP = "in_loop"
    GONE = "gone"


class AcceptorServer:
    """One listening TCP port; each connection is sniffed and routed.

    Build it, register a handler per route, then ``await start(host, port)`` on
    the loop it will run in. ``statistics()`` counts accepted, routed (per
    route) and rejected (per reason kind) connections.
    """

    def __init__(
        self,
        limits: AcceptorLimits | None = None,
        *,
        sniffer: Callable[[bytes], Sniffed] = sniff,
        max_sniff_bytes: int = MAX_SNIFF_BYTES,
        log: Any = None,
    ) -> None:
        self.limits = limits or AcceptorLimits()
        self.limiter = ConnectionLimiter(self.limits.max_per_source, self.limits.max_total)
        self.sniffer = sniffer
        self.max_sniff_bytes = max_sniff_bytes
        self.log = log if log is not None else structlog.get_logger("villagemesh.acceptor")
        self._in_loop: dict[Route, ProtocolFactory] = {}
        self._hand_off: dict[Route, HandOff] = {}
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.counts: Counter[str] = Counter()

    # -- configuration -------------------------------------------------------------------------

    def route_in_loop(self, route: Route, factory: ProtocolFactory) -> None:
        """Serve ``route`` on this loop with protocols made by ``factory``."""
        self._check_free(route)
        self._in_loop[route] = factory

    def route_hand_off(self, route: Route, callback: HandOff) -> None:
        """Hand ``route``'s connections to ``callback`` as :class:`HandedOff` (cross-thread)."""
        self._check_free(route)
        self._hand_off[route] = callback

    def _check_free(self, route: Route) -> None:
        if route in self._in_loop or route in self._hand_off:
            raise ConfigError(f"route {route.value!r} already has a handler")

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, backlog: int = 1024) -> tuple[str, int]:
        """Listen on ``host:port`` (0 = any free port); returns the bound address."""
        self._loop = asyncio.get_running_loop()
        try:
            self._server = await self._loop.create_server(
                lambda: _SniffingProtocol(self), host, port, backlog=backlog, reuse_address=True
            )
        except OSError as exc:
            raise ConnectError(f"acceptor cannot listen on {host}:{port}: {exc}") from exc
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``; ConfigError before :meth:`start`."""
        if self._server is None:
            raise ConfigError("acceptor is not listening yet")
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def close(self) -> None:
        """Stop listening. Routed connections belong to their handlers and stay open."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def statistics(self) -> dict[str, int]:
        """Counters: ``accepted``, ``routed.<route>``, ``rejected.<kind>``, and ``open`` now."""
        return {**self.counts, "open": self.limiter.total}

    # -- called by the per-connection protocol ------------------------------------------------------

    def _reject(
        self, transport: asyncio.BaseTransport, peer: str, reason: str, kind: str, verdict: Sniffed | None, peeked: int
    ) -> None:
        self.counts[f"rejected.{kind}"] += 1
        self.log.warning(
            "connection_rejected",
            peer=peer,
            reason=reason,
            protocol=verdict.value if verdict is not None else None,
            peeked_bytes=peeked,
        )
        transport.abort()


class _SniffingProtocol(asyncio.BufferedProtocol):
    """Per connection: buffer up to MAX_SNIFF_BYTES, sniff on every arrival, route once."""

    __slots__ = ("buf", "n", "peer", "phase", "server", "src", "timer", "transport")

    def __init__(self, server: AcceptorServer) -> None:
        self.server = server
        self.buf = bytearray(server.max_sniff_bytes)
        self.n = 0
        self.phase = _Phase.GONE
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.src = "unknown"
        self.peer = "unknown"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        self.src, self.peer = peer_label(transport.get_extra_info("peername"))
        refusal = server.limiter.refusal(self.src)
        if refusal is not None:
            server._reject(transport, self.peer, refusal, "cap", None, 0)
            return
        server.limiter.try_open(self.src)
        self.phase = _Phase.UNDECIDED
        server.counts["accepted"] += 1
        server.log.debug("connection_accepted", peer=self.peer)
        self.timer = asyncio.get_running_loop().call_later(server.limits.sniff_timeout_s, self._timed_out)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)[self.n :]

    def buffer_updated(self, nbytes: int) -> None:
        if self.phase is not _Phase.UNDECIDED:
            return
        self.n += nbytes
        server = self.server
        peeked = bytes(self.buf[: self.n])
        verdict = server.sniffer(peeked)
        decision = route_for(verdict, buffered=self.n, max_sniff_bytes=server.max_sniff_bytes)
        if decision is None:
            return
        if isinstance(decision, Reject):
            self._give_up(decision.reason, "protocol", verdict)
            return
        if decision in server._in_loop:
            self._hand_in_loop(decision, verdict, peeked)
        elif decision in server._hand_off:
            self._hand_cross_thread(decision, verdict, peeked)
        else:
            self._give_up(f"no handler for route {decision.value}", "unrouted", verdict)

    def eof_received(self) -> bool:
        if self.phase is _Phase.UNDECIDED:
            self._give_up("closed before a verdict", "eof", self.server.sniffer(bytes(self.buf[: self.n])))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase is _Phase.UNDECIDED:
            self._release()

    # -- outcomes ----------------------------------------------------------------------------------

    def _release(self) -> None:
        """Stop counting this connection and cancel its timer (exactly once)."""
        self.phase = _Phase.GONE
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server.limiter.close(self.src)

    def _timed_out(self) -> None:
        self.timer = None
        if self.phase is _Phase.UNDECIDED:
            verdict = self.server.sniffer(bytes(self.buf[: self.n]))
            self._give_up(f"no verdict within {self.server.limits.sniff_timeout_s} s", "timeout", verdict)

    def _give_up(self, reason: str, kind: str, verdict: Sniffed) -> None:
        assert self.transport is not None
        self._release()
        self.server._reject(self.transport, self.peer, reason, kind, verdict, self.n)

    def _routed(self, route: Route, verdict: Sniffed, mode: str) -> None:
        server = self.server
        server.counts[f"routed.{route.value}"] += 1
        server.log.debug(
            "connection_routed",
            peer=self.peer,
            route=route.value,
            protocol=verdict.value,
            peeked_bytes=self.n,
            mode=mode,
        )

    def _hand_in_loop(self, route: Route, verdict: Sniffed, peeked: bytes) -> None:
        assert self.transport is not None
        transport = self.transport
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.phase = _Phase.IN_LOOP
        inner = self.server._in_loop[route]()
        counted: asyncio.BaseProtocol
        if isinstance(inner, asyncio.BufferedProtocol):
            counted = _CountedBuffered(inner, self._release_in_loop)
        else:
            counted = _Counted(inner, self._release_in_loop)
        self._routed(route, verdict, "in_loop")
        transport.set_protocol(counted)
        counted.connection_made(transport)
        if not transport.is_closing():
            feed(counted, peeked)

    def _release_in_loop(self) -> None:
        if self.phase is _Phase.IN_LOOP:
            self.phase = _Phase.GONE
            self.server.limiter.close(self.src)

    def _hand_cross_thread(self, route: Route, verdict: Sniffed, peeked: bytes) -> None:
        assert self.transport is not None
        transport = self.transport
        transport.pause_reading()
        try:
            sock = transport.get_extra_info("socket").dup()
        except OSError as exc:
            self._give_up(f"cannot duplicate the socket: {exc}", "dup", verdict)
            return
        self._release()
        transport.abort()  # closes our descriptor only; the duplicate keeps the connection
        self._routed(route, verdict, "hand_off")
        try:
            self.server._hand_off[route](HandedOff(sock, peeked, self.peer, route))
        except Exception as exc:  # noqa: BLE001 - a failing receiver loses this connection, not the acceptor
            sock.close()
            self.server.counts["rejected.hand_off"] += 1
            self.server.log.warning(
                "connection_rejected",
                peer=self.peer,
                reason=f"hand-off failed: {type(exc).__name__}: {exc}",
                protocol=verdict.value,
                peeked_bytes=self.n,
            )


class _Counted(asyncio.Protocol):
    """Forwards everything to a routed protocol and releases the cap slot when it closes."""

    def __init__(self, inner: asyncio.BaseProtocol, on_lost: Callable[[], None]) -> None:
        self.inner = inner
        self.on_lost = on_lost
        # Bind once: these run per read, so skip an indirection.
        self.data_received = inner.data_received  # type: ignore[attr-defined,method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[attr-defined,no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.inner.connection_lost(exc)
        finally:
            self.on_lost()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _CountedBuffered(asyncio.BufferedProtocol):
    """:class:`_Counted` for a ``BufferedProtocol``."""

    def __init__(self, inner: asyncio.BufferedProtocol, on_lost: Callable[[], None]) -> None:
        self.inner = inner
        self.on_lost = on_lost
        self.get_buffer = inner.get_buffer  # type: ignore[method-assign]
        self.buffer_updated = inner.buffer_updated  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.inner.connection_lost(exc)
        finally:
            self.on_lost()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()
