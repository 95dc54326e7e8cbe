"""The sniffing acceptor: one TCP port, every protocol, not one byte lost.

Each accepted connection gets a :class:`_SniffingProtocol` (an asyncio
``Protocol``: callbacks, not streams, so no byte can sit unseen in a reader).
A whole first request arrives in one read and is handed on whole; what an
*undecided* connection keeps between reads is its prefix, shorter than
``MAX_SNIFF_BYTES`` (the sniffer decides by then, or the prefix is refused). On
every arrival the acceptor asks :func:`~villagemesh.protocols.sniff.sniff`
about the whole prefix and looks the verdict up in :data:`~.state.ROUTES`::

    accept ─▶ limiter.try_open(src) ──no──▶ reject "per-source cap ..." / "total cap ..."
                   │    (total cap only: the oldest silent undecided connection is evicted instead)
                   │yes
                   ▼
             UNDECIDED ──bytes──▶ sniff(prefix) ──NEED_MORE──▶ (wait for the deadline)
                   │                   │
       deadline / EOF                  ├─ UNKNOWN, prefix too long, route without handler ─▶ reject
                   ▼                   ▼
                reject            hand-off (in-loop or cross-thread), every byte read so far

One sweep timer per acceptor (every ``sniff_timeout_s / 4``) drops undecided
connections that have had their time: a slow or silent client gets more than
``sniff_timeout_s`` and at most 1.25 × that, and an accept costs no timer and
no clock read of its own.

Two hand-off modes (a route has one handler, registered with one of them):

**in-loop** (:meth:`AcceptorServer.route_in_loop`): for protocols served on the
acceptor's own loop (aiohttp's ``RequestHandler`` is one). The handler's
protocol gets ``connection_made(transport)`` and then every peeked byte, in
order, before anything newer. A plain ``Protocol`` is not switched in: the
sniffing protocol stays the transport's and passes each later read straight
through (one call; a protocol switch and a helper object per accept cost more,
the benchmark shows), forwarding EOF, flow control and ``connection_lost``. A
``BufferedProtocol`` is switched in behind a small forwarder, since the
transport picks its read path by protocol type. Either way the connection
keeps counting against the source's cap until it closes.

**cross-thread** (:meth:`AcceptorServer.route_hand_off`): for protocols owned by
another actor's loop. Reading is paused, the socket is ``dup()``-ed, and the
transport is *aborted*: asyncio closes its descriptor after unregistering it
from its selector, and ``close()`` on one of two descriptors of a socket sends
nothing (no FIN, no RST: that happens only when the last descriptor goes, and
only ``shutdown()`` would act earlier; the acceptor never calls it). The
callback receives a :class:`HandedOff` with the duplicate socket, the peeked
bytes and the peer; the adopting loop runs :func:`adopt` (``connect_accepted_socket``
with a protocol that feeds ``handed.peeked`` inside ``connection_made``, before
the transport can read). Bytes the client sent after the peek
are still in the kernel's buffer and arrive on the new loop in order. The
callback runs on the acceptor's loop and must only pass the value on
(``call_soon_threadsafe``, a queue); if it raises, the socket is closed and the
failure logged as a rejection. The connection's slot in the limiter goes with
it (``HandedOff.release``): it keeps counting until the adopter's transport is
lost, so the caps bound every connection of the node, not only the undecided.

Log events (structlog, fixed keys):
``connection_accepted`` (peer), ``connection_routed`` (peer, route, protocol,
peeked_bytes, mode), ``connection_rejected`` (peer, reason, protocol,
peeked_bytes; the first few of each second, see
:class:`~villagemesh.actors.core.handoff.RefusalLog`), ``connections_refused``
(the second's counts, when there were more).
"""

from __future__ import annotations

import asyncio
import enum
import fcntl
import functools
import itertools
import logging
import sys
import termios
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import structlog

from villagemesh.actors.acceptor.state import (
    AcceptorLimits,
    Reject,
    routing_plan,
)
from villagemesh.actors.core.handoff import (
    ConnectionLimiter,
    HandedOff,
    ProtocolFactory,
    RefusalLog,
    Route,
    feed,
    peer_label,
)
from villagemesh.errors import ConfigError, ConnectError
from villagemesh.protocols.sniff import MAX_SNIFF_BYTES, Sniffed, sniff

__all__ = ["AcceptorServer", "HandOff"]

EVICTION_SCAN = 64
"""Undecided connections looked at, oldest first, for a silent one to evict at the total cap."""

SWEEP_FRACTION = 4
"""The timeout sweep runs every ``sniff_timeout_s / 4``: a silent client goes within 1.25 × the timeout."""

HandOff = Callable[[HandedOff], None]
"""Receives cross-thread hand-offs, on the acceptor's loop; must return at once."""


@dataclass(frozen=True, slots=True)
class _Handler:
    """A registered route: in-loop factory or hand-off callback, and its statistics key."""

    route: Route
    in_loop: bool
    target: Callable[..., Any]
    key: str


def debug_enabled(log: Any) -> bool:
    """Whether ``log`` would emit debug events (True when it cannot tell)."""
    bound = log.bind() if hasattr(log, "bind") else log
    check = getattr(bound, "is_enabled_for", None)
    return bool(check(logging.DEBUG)) if callable(check) else True


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
        limiter: ConnectionLimiter | None = None,
    ) -> None:
        self.limits = limits or AcceptorLimits()
        self.limiter = limiter or ConnectionLimiter(self.limits.max_per_source, self.limits.max_total)
        """The node's one count of connections (shared with the loops that adopt hand-offs)."""
        self.sniffer = sniffer
        self.max_sniff_bytes = max_sniff_bytes
        self.log = log if log is not None else structlog.get_logger("villagemesh.acceptor")
        self.refusals = RefusalLog(self.log)
        self._handlers: dict[Route, _Handler] = {}
        self._plan: dict[str, _Handler | Reject | None] = {}
        """Keyed by the verdict's ``_name_``: a str hashes in C, an Enum member through Python."""
        self._replan()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._tick = 0
        """Sweeps so far: a connection remembers the tick it arrived in, not a clock reading."""
        self._undecided: dict[_SniffingProtocol, None] = {}
        """Undecided connections in arrival order (an ordered set: the oldest is evicted first)."""
        self.counts: Counter[str] = Counter()
        self.debug = True
        """Emit the per-connection debug events; decided by :meth:`start` from the logger's level."""

    # -- configuration -------------------------------------------------------------------------

    def route_in_loop(self, route: Route, factory: ProtocolFactory) -> None:
        """Serve ``route`` on this loop with protocols made by ``factory``."""
        self._register(_Handler(route, True, factory, f"routed.{route.value}"))

    def route_hand_off(self, route: Route, callback: HandOff) -> None:
        """Hand ``route``'s connections to ``callback`` as :class:`HandedOff` (cross-thread)."""
        self._register(_Handler(route, False, callback, f"routed.{route.value}"))

    def _register(self, handler: _Handler) -> None:
        if handler.route in self._handlers:
            raise ConfigError(f"route {handler.route.value!r} already has a handler")
        self._handlers[handler.route] = handler
        self._replan()

    def _replan(self) -> None:
        """Verdict → handler, rejection or wait, in one lookup per arrival."""
        plan = routing_plan(frozenset(self._handlers))
        self._plan = {v._name_: self._handlers[d] if isinstance(d, Route) else d for v, d in plan.items()}

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, backlog: int = 1024) -> tuple[str, int]:
        """Listen on ``host:port`` (0 = any free port); returns the bound address."""
        self._loop = asyncio.get_running_loop()
        try:
            self._server = await self._loop.create_server(
                functools.partial(_SniffingProtocol, self), host, port, backlog=backlog, reuse_address=True
            )
        except OSError as exc:
            raise ConnectError(f"acceptor cannot listen on {host}:{port}: {exc}") from exc
        self.debug = debug_enabled(self.log)
        self._sweep()
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    def _sweep(self) -> None:
        """Drop every undecided connection older than SWEEP_FRACTION full sweep intervals.

        One timer for all connections instead of one each, and no clock read per
        accept: a connection that arrived during tick ``k`` is dropped at the sweep
        that makes the tick ``k + SWEEP_FRACTION + 1``, so it was given more than
        ``sniff_timeout_s`` and at most 1.25 × ``sniff_timeout_s``.
        """
        assert self._loop is not None
        self._tick += 1
        oldest = self._tick - SWEEP_FRACTION - 1
        for proto in [p for p in self._undecided if p.born <= oldest]:
            proto.timed_out()
        interval = self.limits.sniff_timeout_s / SWEEP_FRACTION
        self._sweeper = self._loop.call_later(interval, self._sweep)

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``; ConfigError before :meth:`start`."""
        if self._server is None:
            raise ConfigError("acceptor is not listening yet")
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def close(self) -> None:
        """Stop listening and drop undecided connections; routed ones belong to their handlers."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for proto in list(self._undecided):
            proto._release()
            if proto.transport is not None:
                proto.transport.abort()
        self.refusals.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def statistics(self) -> dict[str, int]:
        """Counters: ``accepted``, ``routed.<route>``, ``rejected.<kind>``, and ``open`` now."""
        return {**self.counts, "open": self.limiter.total}

    # -- called by the per-connection protocol ------------------------------------------------------

    def _evict_for(self, src: str) -> bool:
        """The total cap is full: make room for a connection from ``src`` by dropping the oldest
        undecided one, if ``src`` is within its own cap; True if it was admitted.

        An undecided connection has proved nothing yet (a client speaking any of our
        protocols sends its first bytes at once), so a flood of silent connections from
        many sources churns through the undecided ones instead of locking everybody out
        until their sniff timeouts; routed connections (established peers) are never evicted.
        """
        if self.limiter.count(src) >= self.limiter.max_per_source:
            return False
        # The oldest one that is silent: a connection whose first bytes already wait in the
        # kernel (this loop accepts a burst before it reads any of them) is about to decide.
        victim = next((p for p in itertools.islice(self._undecided, EVICTION_SCAN) if p.silent()), None)
        if victim is None:
            return False
        reason = f"evicted: total cap {self.limiter.max_total} reached and a newer connection came"
        victim._give_up(reason, "evicted", self.sniffer(victim.pending), len(victim.pending))
        return self.limiter.try_open(src)

    def _reject(
        self, transport: asyncio.Transport, peer: str, reason: str, kind: str, verdict: Sniffed | None, peeked: int
    ) -> None:
        self.counts[f"rejected.{kind}"] += 1
        src = peer.rsplit(":", 1)[0]
        protocol = verdict.value if verdict is not None else None
        self.refusals.refuse(kind, src, peer=peer, reason=reason, protocol=protocol, peeked_bytes=peeked)
        transport.abort()


class _SniffingProtocol(asyncio.Protocol):
    """Per connection: hold at most MAX_SNIFF_BYTES undecided, sniff on every arrival, route once."""

    # Slots and no per-connection helper objects: every object an accept allocates
    # adds garbage-collector work, which the benchmark shows as much as the sniffing.
    __slots__ = ("born", "inner", "peername", "pending", "phase", "server", "src", "transport")

    def __init__(self, server: AcceptorServer) -> None:
        self.server = server
        self.inner: asyncio.BaseProtocol | None = None
        self.pending = b""
        self.phase = _Phase.GONE
        self.born = 0
        self.transport: asyncio.Transport | None = None
        self.src = "unknown"
        self.peername: Any = None

    @property
    def peer(self) -> str:
        """``host:port`` of the client, formatted only when something logs it."""
        return peer_label(self.peername)[1]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # create_server makes stream transports
        server = self.server
        self.peername = peername = transport.get_extra_info("peername")
        self.src = src = peername[0] if type(peername) is tuple else "unknown"
        if not server.limiter.try_open(src) and not server._evict_for(src):
            server._reject(transport, self.peer, server.limiter.refusal(src) or "cap", "cap", None, 0)
            return
        self.phase = _Phase.UNDECIDED
        server._undecided[self] = None
        self.born = server._tick
        server.counts["accepted"] += 1
        if server.debug:
            server.log.debug("connection_accepted", peer=self.peer)

    def data_received(self, data: bytes) -> None:
        inner = self.inner
        if inner is not None:  # routed in-loop to a plain Protocol: pass straight through
            inner.data_received(data)  # type: ignore[attr-defined]
            return
        if self.phase is not _Phase.UNDECIDED:
            return
        server = self.server
        peeked = self.pending + data if self.pending else data
        verdict = server.sniffer(peeked)
        decision = server._plan[verdict._name_]
        if decision is None:
            if len(peeked) < server.max_sniff_bytes:
                self.pending = peeked
                return
            decision = Reject(f"no verdict within {server.max_sniff_bytes} bytes")
        if type(decision) is _Handler:
            if decision.in_loop:
                self._hand_in_loop(decision, verdict, peeked)
            else:
                self._hand_cross_thread(decision, verdict, peeked)
        else:
            assert isinstance(decision, Reject)
            kind = "unrouted" if decision.reason.startswith("no handler") else "protocol"
            self._give_up(decision.reason, kind, verdict, len(peeked))

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return self.inner.eof_received()  # type: ignore[attr-defined]
        if self.phase is _Phase.UNDECIDED:
            self._give_up("closed before a verdict", "eof", self.server.sniffer(self.pending), len(self.pending))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        inner, self.inner = self.inner, None
        try:
            if inner is not None:
                inner.connection_lost(exc)
        finally:
            if self.phase is _Phase.UNDECIDED:
                self._release()
            else:
                # IN_LOOP (also when the handler's factory or connection_made raised): free the slot once.
                self._release_in_loop()

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # -- outcomes ----------------------------------------------------------------------------------

    def _release(self) -> None:
        """Stop counting this connection (exactly once)."""
        self.phase = _Phase.GONE
        self.server._undecided.pop(self, None)
        self.server.limiter.close(self.src)

    def silent(self) -> bool:
        """No byte read yet and none waiting in the kernel's buffer (FIONREAD)."""
        if self.pending:
            return False
        if self.transport is None:
            return True
        try:
            waiting = fcntl.ioctl(self.transport.get_extra_info("socket").fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return True  # gone already: as good as silent
        return int.from_bytes(waiting, sys.byteorder) == 0

    def timed_out(self) -> None:
        """Called by the server's sweep once the connection has had its sniff timeout."""
        if self.phase is _Phase.UNDECIDED:
            verdict = self.server.sniffer(self.pending)
            reason = f"no verdict within {self.server.limits.sniff_timeout_s} s"
            self._give_up(reason, "timeout", verdict, len(self.pending))

    def _give_up(self, reason: str, kind: str, verdict: Sniffed, peeked: int) -> None:
        assert self.transport is not None
        self._release()
        self.server._reject(self.transport, self.peer, reason, kind, verdict, peeked)

    def _routed(self, handler: _Handler, verdict: Sniffed, peeked: int, mode: str) -> None:
        server = self.server
        server.counts[handler.key] += 1
        if not server.debug:
            return
        server.log.debug(
            "connection_routed",
            peer=self.peer,
            route=handler.route.value,
            protocol=verdict.value,
            peeked_bytes=peeked,
            mode=mode,
        )

    def _hand_in_loop(self, handler: _Handler, verdict: Sniffed, peeked: bytes) -> None:
        assert self.transport is not None
        transport = self.transport
        self.phase = _Phase.IN_LOOP
        self.server._undecided.pop(self, None)
        inner = handler.target()
        self._routed(handler, verdict, len(peeked), "in_loop")
        if isinstance(inner, asyncio.BufferedProtocol):
            # The transport picks its read path by protocol type: switch to a buffered forwarder.
            counted = _CountedBuffered(inner, self._release_in_loop)
            transport.set_protocol(counted)
            counted.connection_made(transport)
            if not transport.is_closing():
                feed(counted, peeked)
            return
        if not isinstance(inner, asyncio.Protocol):
            raise ConfigError(f"route {handler.route.value!r} made {inner!r}, not a stream protocol")
        # A plain Protocol: stay the transport's protocol and pass reads straight through
        # (no protocol switch, no extra object), forward the rare callbacks, release on close.
        self.inner = inner
        inner.connection_made(transport)
        if not transport.is_closing():
            inner.data_received(peeked)

    def _release_in_loop(self) -> None:
        if self.phase is _Phase.IN_LOOP:
            self.phase = _Phase.GONE
            self.server.limiter.close(self.src)

    def _hand_cross_thread(self, handler: _Handler, verdict: Sniffed, peeked: bytes) -> None:
        assert self.transport is not None
        transport = self.transport
        transport.pause_reading()
        try:
            sock = transport.get_extra_info("socket").dup()
        except OSError as exc:
            self._give_up(f"cannot duplicate the socket: {exc}", "dup", verdict, len(peeked))
            return
        # The slot goes with the connection: it counts until the adopter's transport is lost.
        self.phase = _Phase.GONE
        self.server._undecided.pop(self, None)
        release = self.server.limiter.slot(self.src)
        transport.abort()  # closes our descriptor only; the duplicate keeps the connection
        self._routed(handler, verdict, len(peeked), "hand_off")
        try:
            handler.target(HandedOff(sock, peeked, self.peer, handler.route, release))
        except Exception as exc:  # noqa: BLE001 - a failing receiver loses this connection, not the acceptor
            sock.close()
            release()
            self.server.counts["rejected.hand_off"] += 1
            self.server.refusals.refuse(
                "hand_off",
                self.src,
                peer=self.peer,
                reason=f"hand-off failed: {type(exc).__name__}: {exc}",
                protocol=verdict.value,
                peeked_bytes=len(peeked),
            )


class _CountedBuffered(asyncio.BufferedProtocol):
    """Forwards everything to a routed ``BufferedProtocol`` and releases the cap slot when it closes."""

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
