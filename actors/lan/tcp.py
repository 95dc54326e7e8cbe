"""Discovery JSON over TCP: the responder behind the acceptor's DISCOVERY route, and the probe.

The acceptor's port answers "who are you?" in the replaced system's framing
(4-byte big-endian length + UTF-8 JSON, :mod:`villagemesh.protocols.discovery`)::

    prober                                   acceptor ─▶ DiscoveryResponder (in-loop hand-off)
      │ ANNOUNCE (signed, optional) ──────────▶│   the prober introduces itself: no probe back needed
      │ PEER_LIST (optional, after an ANNOUNCE)▶│   push: whom the prober knows (push-pull exchange)
      │ DISCOVERY_REQUEST (unsigned) ─────────▶│
      │◀──────── DISCOVERY_RESPONSE (signed) ──│   node id bound to our key, fresh timestamp
      │ PEER_LIST_REQUEST(limit) ─────────────▶│   (optional, usually in the same write)
      │◀──────── PEER_LIST ────────────────────│   other nodes' signed announces, as we verified them
      │ legacy PEER_DISCOVERY (unsigned) ─────▶│
      │◀─────── PEER_DISCOVERY (unsigned) ─────│   sender_id + sender_port + capabilities: what the
                                                   legacy client reads (it cannot check a signature)

This is also the WebSocket transport's probe: a peer advertised as
``ws://host:port`` is probed with :func:`probe` on the same host and port (the
acceptor sniffs the discovery frame), so there is one discovery exchange, not
one per transport.

Rules: the responder answers each request in order on the same connection
and never volunteers anything; a verified ANNOUNCE is passed to ``on_announce``
and marks the connection as that node's; a pushed PEER_LIST is passed to
``on_peer_list`` only on a connection so marked (else ignored and counted:
an anonymous client cannot make us verify its list), and only the first one
on a connection (a flood of lists is ignored); a request whose sender
did not announce itself on the connection goes to ``on_request`` (to be probed
back); anything else (an announce, a response) is
ignored and counted; a protocol error closes the connection with a
``discovery_rejected`` event (keys ``peer``, ``reason``); a connection with no
complete request for ``IDLE_TIMEOUT_S`` is closed.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from villagemesh.actors.core.handoff import peer_label
from villagemesh.actors.lan.identity import Identity
from villagemesh.errors import ConnectError, RemoteProtocolError, TransportTimeout
from villagemesh.protocols.discovery import (
    NEED_DATA,
    Announce,
    DiscoveryConnection,
    DiscoveryRequest,
    DiscoveryResponse,
    LegacyPeerDiscovery,
    PeerList,
    PeerListRequest,
    RelayedPeer,
)

__all__ = ["IDLE_TIMEOUT_S", "SIGNED_REUSE_S", "DiscoveryResponder", "Probed", "SignedFrames", "probe"]

SIGNED_REUSE_S = 1.0
"""A signed response or announce is reused for this long (its timestamp says when it was signed):
signing and checking one costs more than the rest of an exchange, and freshness is judged in minutes."""

PeerLists = Callable[[PeerListRequest], bytes]
"""A request -> the framed PEER_LIST answering it (the changes after its cursor)."""


class SignedFrames:
    """One of our signed messages (``make()``: a response or an announce), framed, signed again
    once ``reuse_s`` has passed."""

    def __init__(
        self,
        make: Callable[[], DiscoveryResponse | Announce],
        reuse_s: float = SIGNED_REUSE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.make = make
        self.reuse_s = reuse_s
        self.clock = clock
        self._framed = b""
        self._signed_at = -float("inf")

    def framed(self) -> bytes:
        """The bytes to write: the message signed under ``reuse_s`` ago."""
        now = self.clock()
        if now - self._signed_at >= self.reuse_s:
            self._framed = DiscoveryConnection().send(self.make())
            self._signed_at = now
        return self._framed


IDLE_TIMEOUT_S = 10.0
"""A discovery exchange is one round trip; 10 s without a complete request means a stuck client."""


class DiscoveryResponder(asyncio.Protocol):
    """Answers discovery requests on one connection (register its factory on the acceptor's DISCOVERY route)."""

    def __init__(
        self,
        identity: Identity,
        *,
        counts: Counter[str] | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        log: Any = None,
        on_request: Callable[[DiscoveryRequest], None] | None = None,
        on_announce: Callable[[Announce, bytes], None] | None = None,
        on_peer_list: Callable[[PeerList, str], None] | None = None,
        responses: SignedFrames | None = None,
        peer_lists: PeerLists | None = None,
    ) -> None:
        self.identity = identity
        self.responses = responses if responses is not None else SignedFrames(identity.response, reuse_s=0.0)
        self.peer_lists = peer_lists
        """What to answer a PEER_LIST_REQUEST with; an empty list without it."""
        self.on_request = on_request
        """Told every request whose sender did not announce itself here, so it can be probed back."""
        self.on_announce = on_announce
        """Told every verified announce (and its body) that came on this connection."""
        self.on_peer_list = on_peer_list
        """Told every list pushed on a connection whose sender announced itself (and that node id)."""
        self.announced = ""
        """The node id of the last verified announce on this connection."""
        self.took_push = False
        """One pushed list per connection is read: an exchange pushes one, a flood is ignored."""
        self.conn = DiscoveryConnection(allow_unsigned_legacy=True)
        self.counts = counts if counts is not None else Counter()
        self.idle_timeout_s = idle_timeout_s
        self.log = log if log is not None else structlog.get_logger("villagemesh.discovery")
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown"
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = peer_label(transport.get_extra_info("peername"))[1]
        self._arm()

    def _arm(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(self.idle_timeout_s, self._idle_out)

    def _idle_out(self) -> None:
        self._reject(f"no complete request within {self.idle_timeout_s} s")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.conn.receive_data(data)
        while not self.transport.is_closing():
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                self._reject(str(exc))
                return
            if event is NEED_DATA:
                return
            self._arm()
            if isinstance(event, DiscoveryRequest):
                self.counts["answered"] += 1
                self.transport.write(self.responses.framed())
                if self.on_request is not None and event.node_id != self.announced:
                    self.on_request(event)
            elif isinstance(event, Announce):
                self.counts["announced"] += 1
                self.announced = event.node_id
                if self.on_announce is not None:
                    self.on_announce(event, self.conn.last_body)
            elif isinstance(event, PeerList) and self.announced and not self.took_push:
                self.took_push = True
                self.counts["pushed"] += 1
                if self.on_peer_list is not None:
                    self.on_peer_list(event, self.announced)
            elif isinstance(event, PeerListRequest):
                self.counts["lists"] += 1
                if self.peer_lists is not None:
                    self.transport.write(self.peer_lists(event))
                else:
                    self.transport.write(self.conn.send(PeerList(())))
            elif isinstance(event, LegacyPeerDiscovery):
                self.counts["answered_legacy"] += 1
                self.transport.write(self.conn.send(self.identity.legacy_response()))
            else:
                self.counts["ignored"] += 1

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _reject(self, reason: str) -> None:
        self.counts["rejected"] += 1
        self.log.warning("discovery_rejected", peer=self.peer, reason=reason)
        if self.transport is not None:
            self.transport.abort()


@dataclass(frozen=True, slots=True)
class Probed:
    """What a probe learned: the peer's verified response, the round trip, and the peers it passed on."""

    response: DiscoveryResponse
    body: bytes
    """The response's JSON body as it came (verified: pass it on as it is)."""
    latency_ms: float
    peers: tuple[RelayedPeer, ...] = ()
    """Other nodes' announces, **not verified** (each is checked when decoded); empty unless asked for."""
    cursor: tuple[str, int] = ("", 0)
    """The peer's (book, version) after this list: what to ask from next time."""


async def probe(
    host: str,
    port: int,
    timeout: float,
    *,
    request: DiscoveryRequest,
    want: PeerListRequest | None = None,
    introduce: bytes = b"",
) -> Probed:
    """Ask ``host:port`` who it is and, with ``want``, whom it knows (peer exchange).

    ``introduce`` is written first: framed discovery messages of ours (our signed
    announce, then the peer list we push). Everything goes in one write; the
    answers come back in order.

    Raises:
        ConnectError: the address cannot be reached.
        TransportTimeout: no (complete) answer within ``timeout`` seconds (connect included).
        RemoteProtocolError: the peer answered with garbage, a bad signature, or out of turn.
    """
    where = f"{host}:{port}"
    conn = DiscoveryConnection()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError as exc:
        raise TransportTimeout(f"discovery probe of {where}: no connection within {timeout} s") from exc
    except OSError as exc:
        raise ConnectError(f"discovery probe of {where}: {exc}") from exc
    try:
        started = time.perf_counter()
        asks = introduce + conn.send(request) + (conn.send(want) if want is not None else b"")
        writer.write(asks)

        async def next_event() -> object:
            while True:
                event = conn.next_event()
                if event is not NEED_DATA:
                    return event
                try:
                    data = await asyncio.wait_for(reader.read(64 * 1024), max(0.0, deadline - loop.time()))
                except TimeoutError as exc:
                    raise TransportTimeout(f"discovery probe of {where}: no answer within {timeout} s") from exc
                except OSError as exc:
                    raise ConnectError(f"discovery probe of {where}: {exc}") from exc
                if not data:
                    raise ConnectError(f"discovery probe of {where}: connection closed before an answer")
                conn.receive_data(data)

        response = await next_event()
        body = conn.last_body
        latency_ms = (time.perf_counter() - started) * 1000.0
        if not isinstance(response, DiscoveryResponse):
            raise RemoteProtocolError(f"discovery probe of {where}: expected a response, got {type(response).__name__}")
        if want is None:
            return Probed(response, body, latency_ms)
        listing = await next_event()
        if not isinstance(listing, PeerList):
            raise RemoteProtocolError(f"discovery probe of {where}: expected a peer list, got {type(listing).__name__}")
        return Probed(response, body, latency_ms, listing.peers[: want.limit], (listing.book, listing.version))
    finally:
        writer.close()
