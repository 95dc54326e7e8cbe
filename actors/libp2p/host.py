"""The libp2p host: villagemesh's sans-I/O libp2p layers driven by asyncio, on the actor's loop.

One :class:`Connection` (an ``asyncio.Protocol``) per TCP connection, either role: the
acceptor hands inbound ones over (:attr:`Libp2pHost.protocol_factory`), :meth:`Libp2pHost.connect`
dials out. Its layers, each a sans-I/O object of :mod:`villagemesh.protocols.libp2p`::

    TCP ─ multistream /noise ─ Noise XX (peer id checked) ─ multistream /yamux/1.0.0 ─ yamux
          SECURITY             NOISE                        MUXER                      MUX
    yamux streams, each negotiated:  /villagemesh/envelope/1.0.0   /ipfs/ping/1.0.0 (echo)   /ipfs/id/1.0.0 (ours)

Rules:

- **One connection per peer, reused.** Connections are kept by the remote's node id once
  yamux is up; a send to a peer already connected reuses that connection (the one it
  opened to us, or ours to the same address: another address is dialled, so a stale or
  wrong one still fails as it should),
  and concurrent dials of one address share one attempt. Envelopes go on one outbound
  ``/villagemesh/envelope/1.0.0`` stream per connection, opened on first use, as
  ``uvarint(len) ‖ envelope`` frames.
- **The sender is the authenticated peer.** An inbound envelope whose ``sender`` is not
  the node id of the key the Noise handshake proved is refused (counted,
  ``envelope_rejected``), never delivered.
- **A misbehaving peer is cut off**, with the typed error that says why, logged as
  ``peer_cut_off`` (peer, peer_id, reason, error): bytes breaking any layer's rules, a
  frame above ``max_frame``, an undecodable envelope, no complete handshake within
  ``handshake_timeout_s``. Only that connection goes; the host serves the others.
- **Bounded.** Dials in progress (``max_pending_dials``), streams per connection and the
  window (yamux), bytes waiting for credit (``max_queued_bytes``: a send then waits, at
  most ``send_timeout_s``), every line and frame.

Errors of :meth:`Libp2pHost.send_many`: :class:`ConnectError` when the peer surely did not
get the bytes (cannot connect, handshake refused, wrong peer, no connection for a reply),
:class:`TransportTimeout` or :class:`TransportError` when it may have.
"""

from __future__ import annotations

import asyncio
import enum
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from villagemesh.actors.core.handoff import peer_label
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.libp2p.aead import BULK_AEAD
from villagemesh.actors.libp2p.state import (
    ENVELOPE_PROTOCOL,
    SERVED_PROTOCOLS,
    DialBackoff,
    Libp2pLimits,
    listen_multiaddr,
    node_id_of,
    target_of,
)
from villagemesh.errors import (
    ConnectError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TransportError,
    TransportTimeout,
)
from villagemesh.protocols.envelope import Message, decode_message
from villagemesh.protocols.framing import NEED_DATA
from villagemesh.protocols.libp2p import yamux
from villagemesh.protocols.libp2p.identify import IDENTIFY_PROTOCOL, PING_PROTOCOL, Identify
from villagemesh.protocols.libp2p.multistream import Negotiation, NoProtocol
from villagemesh.protocols.libp2p.noise import PROTOCOL_ID as NOISE_PROTOCOL
from villagemesh.protocols.libp2p.noise import Authenticated, NoiseSession
from villagemesh.protocols.libp2p.noise import Data as NoiseData
from villagemesh.protocols.libp2p.peerid import ED25519_KEY_PROTO_PREFIX, Multiaddr, PeerId
from villagemesh.protocols.libp2p.varint import UvarintFramer, decode_uvarint, frame

__all__ = ["AGENT_VERSION", "MUXER_PROTOCOL", "Connection", "Handler", "Libp2pHost", "Libp2pStream", "OnMessage"]

MUXER_PROTOCOL = "/yamux/1.0.0"
AGENT_VERSION = "villagemesh/0.1"
PROTOCOL_VERSION = "ipfs/0.1.0"

Handler = Callable[["Libp2pStream"], Awaitable[None]]
"""Serves one inbound stream of a protocol registered in :attr:`Libp2pHost.handlers`."""

OnMessage = Callable[[Message, bytes, str], None]
"""``on_message(message, raw, node_id)``: an envelope from the authenticated peer ``node_id``, on the loop."""


class _Phase(enum.Enum):
    SECURITY = "negotiating security"
    NOISE = "in the Noise handshake"
    MUXER = "negotiating the muxer"
    MUX = "multiplexing"
    CLOSED = "closed"


class _Stream:
    """One yamux stream: its negotiation until agreed, then its protocol's state."""

    __slots__ = ("app", "framer", "negotiation", "pending", "protocol")

    def __init__(self, negotiation: Negotiation, app: Libp2pStream | None = None) -> None:
        self.negotiation: Negotiation | None = negotiation
        self.protocol: str | None = None
        self.framer: UvarintFramer | None = None
        self.pending = bytearray()
        """Our envelope frames written before the peer agreed (outbound envelope stream)."""
        self.app = app
        """The stream's reader and writer when code of ours uses it (opened by us, or a handler's)."""


class Libp2pStream:
    """A yamux stream for code on the loop: ``read`` / ``write`` / ``close``, with yamux's flow control.

    Credit goes back to the peer as :meth:`read` takes bytes, so a reader that stops
    reading stops the peer (at one window). ``read`` returns ``b""`` once the peer
    closed its side; a reset or a lost connection is a :class:`TransportError`.
    """

    def __init__(self, conn: Connection, stream: int, protocol: str | None) -> None:
        self.conn = conn
        self.id = stream
        self.protocol = protocol
        self.agreed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.agreed.add_done_callback(_retrieve)
        if protocol is not None:
            self.agreed.set_result(None)
        self._inbox: deque[bytes | memoryview] = deque()
        """What arrived and was not read yet, a buffer per yamux frame (copied once out of the session's
        decryption buffer, then handed out whole)."""
        self._size = 0
        self._eof = False
        self._error: TransportError | None = None
        self._event = asyncio.Event()

    @property
    def remote(self) -> PeerId | None:
        return self.conn.remote

    def _feed(self, data: bytes | bytearray | memoryview) -> None:
        """A frame's data: a view of the Noise session's buffer, valid only now, so copied (the only copy)."""
        self._inbox.append(data if type(data) is bytes else bytes(data))
        self._size += len(data)
        self._event.set()

    def _end(self, error: TransportError | None = None) -> None:
        self._eof = True
        self._error = self._error or error
        if not self.agreed.done():
            self.agreed.set_exception(error or ConnectError(f"libp2p {self.conn.peer}: stream {self.id} closed"))
        self._event.set()

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` (at least one, waiting for them); ``b""`` at the peer's end of stream.

        Like a socket's ``recv``, it may return less than is there: a yamux frame's data comes as it
        arrived (no copy), small ones are joined up to :data:`GATHER` bytes.

        Raises:
            TransportError: the stream was reset or the connection lost.
        """
        if not await self.more():
            return b""
        inbox, parts, size = self._inbox, [], 0
        while inbox and size < max_bytes and size < GATHER:  # whole chunks while they fit, then part of one
            chunk = inbox.popleft()
            if size + len(chunk) > max_bytes:
                inbox.appendleft(memoryview(chunk)[max_bytes - size :])
                chunk = memoryview(chunk)[: max_bytes - size]
            parts.append(chunk)
            size += len(chunk)
        self._size -= size
        self.conn._consumed(self.id, size)
        first = parts[0]
        return first if len(parts) == 1 and type(first) is bytes else b"".join(parts)

    async def read_exactly(self, size: int) -> bytes:
        """Exactly ``size`` bytes. Raises TransportError if the stream ends before."""
        out = bytearray()
        while len(out) < size:
            chunk = await self.read(size - len(out))
            if not chunk:
                raise TransportError(
                    f"libp2p {self.conn.peer}: stream {self.id} ended after {len(out)} of {size} bytes"
                )
            if len(chunk) == size:
                return chunk  # the usual case: one read, handed on as it is
            out += chunk
        return bytes(out)

    async def more(self) -> bool:
        """Wait until a byte is there to read (True) or the peer ended the stream (False)."""
        while not self._size and not self._eof:
            self._event.clear()
            await self._event.wait()
        if not self._size and self._error is not None:
            raise self._error
        return bool(self._size)

    async def read_frame(self, max_bytes: int) -> bytes:
        """One ``uvarint(len) ‖ bytes`` frame of at most ``max_bytes`` (what follows stays for the next read).

        Raises:
            RemoteProtocolError: the frame is announced larger than ``max_bytes``.
            TransportError: the stream ends inside the frame, is reset, or the connection is lost.
        """
        prefix = b""
        while (head := decode_uvarint(prefix)) is NEED_DATA:
            prefix += await self.read_exactly(1)  # a varint is a few bytes: each is taken (and credited) once
        size, _ = head
        if size > max_bytes:
            raise RemoteProtocolError(
                f"libp2p {self.conn.peer}: a frame of {size} bytes is above the {max_bytes} allowed"
            )
        return await self.read_exactly(size)

    async def write(self, data: bytes) -> None:
        """Send ``data``; returns once the peer's credit and the socket let it out (``send_timeout_s``)."""
        if not self.agreed.done():
            await self.agreed
        conn = self.conn
        conn._app_write(self.id, data)
        if conn._must_wait(self.id):  # most writes need not wait: no coroutine for them
            await conn._drained(self.id)

    def close(self) -> None:
        """Half-close (FIN): we send no more."""
        self.conn._app_close(self.id)


READ_BUFFER = 256 * 1024
"""Bytes one read may take from the socket (asyncio's own default)."""
GATHER = 16 * 1024
"""A read joins queued chunks only until it holds this much: a yamux frame's worth (up to 64 KiB) is
handed out as it is, small ones (pings, envelopes) are joined into one read."""


class Connection(asyncio.BufferedProtocol):
    """One libp2p connection, dialled (``expected`` is the dialled peer id) or accepted.

    A buffered protocol: the loop reads into one buffer of ours (``recv_into``) instead of
    allocating :data:`READ_BUFFER` bytes for every read, which cost more than a ping's crypto.
    """

    def __init__(self, host: Libp2pHost, *, dialer: bool, expected: PeerId | None = None, address: str = "") -> None:
        self.host = host
        self.dialer = dialer
        self.expected = expected
        self.address = address
        self.peer = address or "unknown"
        """The remote as ``host:port`` once connected (logs)."""
        self.phase = _Phase.SECURITY
        self.security = Negotiation.dialer([NOISE_PROTOCOL]) if dialer else Negotiation.listener([NOISE_PROTOCOL])
        self.noise: NoiseSession | None = None
        self.muxer: Negotiation | None = None
        self.mux = yamux.Session(client=dialer, window=host.limits.window)
        self.streams: dict[int, _Stream] = {}
        self.envelope_stream: int | None = None
        self.refused = 0
        """Streams the peer opened beyond the limit (each reset)."""
        self._ungranted: dict[int, int] = {}
        """Bytes consumed per stream whose credit is not given back yet (less than half a window)."""
        self.remote: PeerId | None = None
        self.node_id: str | None = None
        self.observed: Multiaddr | None = None
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[Connection] = loop.create_future()
        self.ready.add_done_callback(_retrieve)  # a failed handshake nobody awaited is not an unraisable error
        self._timer: asyncio.TimerHandle | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._credit = asyncio.Event()
        self._credit.set()
        self._buffer = memoryview(bytearray(READ_BUFFER))

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peername = transport.get_extra_info("peername")
        _, self.peer = peer_label(peername)
        if isinstance(peername, tuple) and len(peername) >= 2:
            try:
                self.observed = Multiaddr.parse(listen_multiaddr(str(peername[0]), int(peername[1])))
            except (ProtocolError, ValueError):  # pragma: no cover - a kernel's peer name is an IP address
                self.observed = None
        self._timer = asyncio.get_running_loop().call_later(self.host.limits.handshake_timeout_s, self._late)
        self.host._opened(self)
        if self.dialer:
            transport.write(self.security.data_to_send())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._buffer[:nbytes])  # no layer keeps a view of it: the next read reuses it

    def data_received(self, data: bytes | memoryview) -> None:
        """Bytes from the peer, through every layer (what ``buffer_updated`` read, or a feed of them)."""
        if self.phase is _Phase.CLOSED:
            return
        try:
            self._feed(data)
        except ProtocolError as exc:
            self.cut_off(exc)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.phase
        self.phase = _Phase.CLOSED
        if self._timer is not None:
            self._timer.cancel()
        if not self.ready.done():
            why = f": {exc}" if exc is not None else ""
            self.ready.set_exception(ConnectError(f"libp2p {self.peer}: closed while {was.value}{why}"))
        self._writable.set()  # wake senders: they find the connection closed
        self._credit.set()
        for state in self.streams.values():
            if state.app is not None:
                state.app._end(TransportError(f"libp2p {self.peer}: the connection was lost"))
        self.host._closed(self)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- the layers ---------------------------------------------------------------------------------

    def _feed(self, data: bytes | memoryview) -> None:
        if self.phase is _Phase.SECURITY:
            events = self.security.receive_data(bytes(data))
            self._write(self.security.data_to_send())
            if any(isinstance(e, NoProtocol) for e in events):
                raise RemoteProtocolError(f"libp2p {self.peer}: the peer speaks no {NOISE_PROTOCOL}")
            if self.security.agreed is None:
                return
            keys = self.host.keys
            if self.dialer:
                self.noise = NoiseSession.initiator(
                    keys.static_key, keys.signing_key, expected_peer=self.expected, bulk=BULK_AEAD
                )
            else:
                self.noise = NoiseSession.responder(keys.static_key, keys.signing_key, bulk=BULK_AEAD)
            self.phase = _Phase.NOISE
            self._write(self.noise.data_to_send())
            data = self.security.rest
            if not data:
                return
        assert self.noise is not None
        for event in self.noise.receive_borrowed(data):  # views valid until the next read: used or copied now
            if isinstance(event, Authenticated):
                self._authenticated(event)
            elif isinstance(event, NoiseData):
                self._plain(event.data)
        self._flush()

    def _authenticated(self, event: Authenticated) -> None:
        self.remote = event.peer_id
        self.node_id = node_id_of(event.peer_id)
        self.phase = _Phase.MUXER
        self.muxer = Negotiation.dialer([MUXER_PROTOCOL]) if self.dialer else Negotiation.listener([MUXER_PROTOCOL])
        self._secure(self.muxer.data_to_send())

    def _plain(self, data: bytes | bytearray | memoryview) -> None:
        if self.phase is _Phase.MUXER:
            assert self.muxer is not None
            events = self.muxer.receive_data(bytes(data))
            self._secure(self.muxer.data_to_send())
            if any(isinstance(e, NoProtocol) for e in events):
                raise RemoteProtocolError(f"libp2p {self.peer}: the peer speaks no {MUXER_PROTOCOL}")
            if self.muxer.agreed is None:
                return
            self.phase = _Phase.MUX
            if self._timer is not None:
                self._timer.cancel()
            self.host._up(self)
            if not self.ready.done():
                self.ready.set_result(self)
            data = self.muxer.rest
        if self.phase is _Phase.MUX and data:
            self._on_mux(self.mux.receive_data(data))

    def _on_mux(self, events: list[yamux.Event]) -> None:
        for event in events:
            if isinstance(event, yamux.Data):
                state = self.streams.get(event.stream)
                if state is not None and state.app is not None and state.negotiation is None:
                    state.app._feed(event.data)  # credit goes back as it is read
                    continue
                self._grant(event.stream, len(event.data))  # handled at once: its credit is due at once
                self._stream_data(event.stream, event.data)
            elif isinstance(event, yamux.StreamOpened):
                self.streams[event.stream] = _Stream(Negotiation.listener(self.host.protocols))
            elif isinstance(event, yamux.StreamClosed):
                state = self.streams.get(event.stream)
                if state is not None and state.app is not None:
                    state.app._end()  # its owner closes its own side
                elif self.mux.is_open(event.stream) and event.stream != self.envelope_stream:
                    self.mux.close(event.stream)
                self._forget_if_gone(event.stream)
            elif isinstance(event, yamux.StreamReset):
                state = self.streams.get(event.stream)
                if state is not None and state.app is not None:
                    state.app._end(TransportError(f"libp2p {self.peer}: the peer reset stream {event.stream}"))
                self._forget_if_gone(event.stream)
            elif isinstance(event, yamux.StreamRefused):
                self._refused(event.stream)
            elif isinstance(event, yamux.GoAway):
                self.host._going_away(self)
        self._credit.set()  # window updates may have let queued bytes out: senders look again

    def _refused(self, stream: int) -> None:
        """The peer opened more streams than yamux allows (it got a reset): counted, logged once per connection."""
        self.host.counts["streams_refused"] += 1
        self.refused += 1
        if self.refused == 1:
            self.host.log.warning(
                "libp2p_streams_refused",
                peer=self.peer,
                peer_id=str(self.remote),
                reason=f"stream {stream} opened beyond the {yamux.MAX_STREAMS} allowed: reset",
            )

    def _forget_if_gone(self, stream: int) -> None:
        if not self.mux.is_open(stream):
            self.streams.pop(stream, None)
            self._ungranted.pop(stream, None)
            if stream == self.envelope_stream:
                self.envelope_stream = None

    def _stream_data(self, stream: int, data: bytes | memoryview) -> None:
        state = self.streams.get(stream)
        if state is None:
            return  # a stream we serve nothing on (already answered)
        if state.negotiation is not None:
            negotiation = state.negotiation
            events = negotiation.receive_data(bytes(data))
            reply = negotiation.data_to_send()
            if reply:
                self.mux.send(stream, reply)
            if any(isinstance(e, NoProtocol) for e in events):
                if state.app is None:
                    raise RemoteProtocolError(f"libp2p {self.peer}: the peer does not speak {ENVELOPE_PROTOCOL}")
                state.app._end(ConnectError(f"libp2p {self.peer}: the peer does not speak {negotiation.protocols[0]}"))
                self.mux.reset(stream)
                self.streams.pop(stream, None)
                return
            if negotiation.agreed is None:
                return
            state.negotiation, state.protocol, data = None, negotiation.agreed, negotiation.rest
            self._agreed(stream, state)
            if state.app is not None:
                state.app.protocol = state.protocol
                if not state.app.agreed.done():
                    state.app.agreed.set_result(None)
                if data:
                    state.app._feed(data)
                return
        if not data:
            return
        if state.protocol == PING_PROTOCOL:
            if self.mux.queued(stream) > self.host.limits.max_queued_bytes:  # it sends and never reads the echo
                self.mux.reset(stream)
                self.streams.pop(stream, None)
                self.host.counts["pings_reset"] += 1
                return
            self.mux.send(stream, data)  # ping: the same bytes back
            self.host.counts["pings_answered"] += 1
        elif state.protocol == ENVELOPE_PROTOCOL and state.framer is not None:
            state.framer.receive_data(data)
            while (raw := state.framer.next_frame()) is not NEED_DATA:
                assert isinstance(raw, bytes)
                self._envelope(raw)
        else:
            raise RemoteProtocolError(f"libp2p {self.peer}: data on stream {stream} ({state.protocol}), which is ours")

    def _agreed(self, stream: int, state: _Stream) -> None:
        handler = self.host.handlers.get(state.protocol or "")
        if handler is not None and state.app is None:  # an inbound stream for a handler of ours
            state.app = Libp2pStream(self, stream, state.protocol)
            self.host._serve(handler, state.app)
        elif state.protocol == IDENTIFY_PROTOCOL:
            self.mux.send(stream, frame(self.host.identify(self.observed).encode()))
            self.mux.close(stream)
            self.host.counts["identified"] += 1
        elif state.protocol == ENVELOPE_PROTOCOL:
            if stream == self.envelope_stream:  # ours, outbound: what waited for the agreement goes now
                if state.pending:
                    self.mux.send(stream, bytes(state.pending))
                    state.pending.clear()
            else:
                state.framer = UvarintFramer(self.host.limits.max_frame)

    def _envelope(self, raw: bytes) -> None:
        message = decode_message(raw)  # a RemoteProtocolError cuts the peer off
        if message.sender != self.node_id:
            self.host.counts["envelopes_rejected"] += 1
            self.host.log.warning(
                "envelope_rejected",
                peer=self.peer,
                peer_id=str(self.remote),
                reason=f"sender {message.sender!r} is not the authenticated node {self.node_id}",
            )
            return
        self.host.counts["received"] += 1
        assert self.node_id is not None
        self.host.on_message(message, raw, self.node_id)

    # -- writing ------------------------------------------------------------------------------------

    def _write(self, data: bytes | bytearray) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _secure(self, data: bytes) -> None:
        if data:
            self._secure_frames([data])

    def _secure_frames(self, frames: list[bytes]) -> None:
        if frames:
            assert self.noise is not None
            self.noise.send_frames(frames)
            self._write(self.noise.data_to_send())

    def _flush(self) -> None:
        """Whatever the muxer has to say (frames, credit, pong), encrypted frame by frame into one write."""
        if self.phase is _Phase.MUX:
            self._secure_frames(self.mux.frames_to_send())
        elif self.noise is not None:
            self._write(self.noise.data_to_send())

    def send_now(self, raws: list[bytes]) -> bool:
        """:meth:`send_many` at once, from a plain loop callback, when nothing would make it wait: the
        envelope stream is open and nothing waits for credit, its agreement or the socket. False
        (nothing sent): use :meth:`send_many`, which waits, and raises what stands in the way."""
        stream = self.envelope_stream
        if self.phase is not _Phase.MUX or stream is None or self._must_wait(stream):
            return False
        self._put(stream, raws)
        return True

    async def send_many(self, raws: list[bytes]) -> None:
        """Envelopes on this connection's envelope stream, in order, in one write; returns once they are written.

        Raises:
            TransportError: the connection closed (the peer may have some of the bytes).
            TransportTimeout: the peer's credit or the socket's buffer did not let them out in time.
        """
        if self.phase is not _Phase.MUX:
            raise ConnectError(f"libp2p {self.peer}: the connection is {self.phase.value}")
        try:
            stream = self._envelope_stream()
        except LocalProtocolError as exc:  # the muxer refuses new streams (going away, too many)
            raise ConnectError(f"libp2p {self.peer}: no envelope stream: {exc}") from exc
        self._put(stream, raws)
        await self._drained(stream)

    def _put(self, stream: int, raws: list[bytes]) -> None:
        """``raws`` framed on ``stream`` in one write (held until its agreement while that runs), counted."""
        data = b"".join(frame(raw) for raw in raws)
        state = self.streams[stream]
        if state.negotiation is not None:
            state.pending += data
        else:
            self.mux.send(stream, data)
        self._flush()
        self.host.counts["sent"] += len(raws)

    async def open_stream(self, protocol: str) -> Libp2pStream:
        """A new stream speaking ``protocol`` (negotiated; within ``handshake_timeout_s``).

        Raises:
            ConnectError: the connection is not up, the muxer refuses a new stream, or the
                peer does not speak ``protocol``.
            TransportTimeout: the peer did not answer the negotiation in time.
        """
        if self.phase is not _Phase.MUX:
            raise ConnectError(f"libp2p {self.peer}: the connection is {self.phase.value}")
        try:
            stream = self.mux.open_stream()
        except LocalProtocolError as exc:
            raise ConnectError(f"libp2p {self.peer}: no new stream: {exc}") from exc
        negotiation = Negotiation.dialer([protocol])
        app = Libp2pStream(self, stream, None)
        self.streams[stream] = _Stream(negotiation, app)
        self.mux.send(stream, negotiation.data_to_send())
        self._flush()
        limit = self.host.limits.handshake_timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(app.agreed), limit)
        except TimeoutError as exc:
            raise TransportTimeout(f"libp2p {self.peer}: no answer to {protocol} within {limit} s") from exc
        return app

    def _consumed(self, stream: int, size: int) -> None:
        if self.phase is _Phase.MUX and self._grant(stream, size):
            self._flush()

    def _grant(self, stream: int, size: int) -> bool:
        """Give ``size`` bytes of credit back, in one WINDOW_UPDATE per half window (not one per read:
        a ping would cost two more frames, each encrypted and written); whether one is due now."""
        due = self._ungranted.get(stream, 0) + size
        if due >= self.host.limits.window // 2:
            self._ungranted.pop(stream, None)
            self.mux.consumed(stream, due)
            return True
        self._ungranted[stream] = due
        return False

    def _app_write(self, stream: int, data: bytes) -> None:
        if self.phase is not _Phase.MUX or not self.mux.is_open(stream):
            raise TransportError(f"libp2p {self.peer}: stream {stream} is not open for writing")
        self.mux.send(stream, data)
        self._flush()

    def _app_close(self, stream: int) -> None:
        if self.phase is _Phase.MUX and self.mux.is_open(stream):
            try:
                self.mux.close(stream)
            except LocalProtocolError:
                return  # closed by us already
            self._flush()
            self._forget_if_gone(stream)

    def _envelope_stream(self) -> int:
        if self.envelope_stream is not None:
            return self.envelope_stream
        stream = self.mux.open_stream()
        negotiation = Negotiation.dialer([ENVELOPE_PROTOCOL])
        self.streams[stream] = _Stream(negotiation)
        self.mux.send(stream, negotiation.data_to_send())
        self.envelope_stream = stream
        return stream

    def _waiting(self, stream: int) -> int:
        """Bytes of ``stream`` not out yet: queued for the peer's credit, or for its agreement."""
        state = self.streams.get(stream)
        return self.mux.queued(stream) + (len(state.pending) if state is not None else 0)

    def _must_wait(self, stream: int) -> bool:
        """Whether a writer on ``stream`` waits in :meth:`_drained`: too much queued, the socket's buffer
        full, or the connection gone (the wait then raises)."""
        return (
            self.phase is _Phase.CLOSED
            or self._waiting(stream) > self.host.limits.max_queued_bytes
            or not self._writable.is_set()
        )

    async def _drained(self, stream: int) -> None:
        limits = self.host.limits
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.send_timeout_s
        while self.phase is not _Phase.CLOSED and self._must_wait(stream):
            self._credit.clear()
            left = deadline - loop.time()
            if left <= 0:
                waiting = self._waiting(stream)
                raise TransportTimeout(
                    f"libp2p {self.peer}: {waiting} bytes still wait for the peer after {limits.send_timeout_s} s"
                )
            waiter = self._credit if self._writable.is_set() else self._writable
            try:
                async with asyncio.timeout(left):  # not wait_for: on 3.11 it can swallow a cancel (see lan.beacon)
                    await waiter.wait()
            except TimeoutError:
                continue  # the loop's condition says what is still missing
        if self.phase is _Phase.CLOSED:
            raise TransportError(f"libp2p {self.peer}: the connection closed while sending")

    # -- ending -------------------------------------------------------------------------------------

    def cut_off(self, error: BaseException) -> None:
        """Drop this connection for ``error`` (logged as ``peer_cut_off``)."""
        self.host.counts["cut_off"] += 1
        self.host.log.warning(
            "peer_cut_off",
            peer=self.peer,
            peer_id=str(self.remote) if self.remote is not None else None,
            reason=str(error),
            error=type(error).__name__,
        )
        if not self.ready.done():
            self.ready.set_exception(ConnectError(f"libp2p {self.peer}: {error}"))
        self.phase = _Phase.CLOSED
        if self.transport is not None:
            self.transport.abort()

    def _late(self) -> None:
        if self.phase is not _Phase.MUX and self.phase is not _Phase.CLOSED:
            limit = self.host.limits.handshake_timeout_s
            self.cut_off(TransportTimeout(f"no complete libp2p handshake within {limit} s ({self.phase.value})"))

    def close(self) -> None:
        """Say GoAway (when multiplexing) and close."""
        if self.phase is _Phase.MUX:
            self.mux.go_away()
            self._flush()
        if self.transport is not None:
            self.transport.close()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class Libp2pHost:
    """Every libp2p connection of one node, on one loop.

    Args:
        keys: the node's keys (its Ed25519 key is its libp2p identity; its X25519 key the Noise static key).
        on_message: receives every envelope an authenticated peer sends.
        listen: this node's multiaddr without ``/p2p/`` (identify lists it), or None.
        limits: the timeouts and bounds.
        log: a structlog-shaped logger.
    """

    def __init__(
        self,
        keys: NodeKeys,
        on_message: OnMessage,
        *,
        listen: str | None = None,
        limits: Libp2pLimits | None = None,
        log: Any = None,
    ) -> None:
        self.keys = keys
        self.on_message = on_message
        self.limits = limits or Libp2pLimits()
        self.log = log if log is not None else structlog.get_logger("villagemesh.libp2p")
        self.peer_id = PeerId.from_ed25519(keys.identity)
        self.listen = tuple(Multiaddr.parse(a) for a in ([listen] if listen else []))
        self.counts: Counter[str] = Counter()
        self.peers: dict[str, Connection] = {}
        """Connections up (yamux agreed), by the remote's node id: the newest of each peer."""
        self._all: set[Connection] = set()
        self._dialing: dict[str, asyncio.Future[Connection]] = {}
        self._backoff = DialBackoff(self.limits.dial_backoff_s, self.limits.dial_backoff_max_s)
        self.handlers: dict[str, Handler] = {}
        """Protocols served by code of ours (``handler(stream)`` runs as a task per inbound stream)."""
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def protocols(self) -> tuple[str, ...]:
        """What an inbound stream may speak."""
        return SERVED_PROTOCOLS + tuple(self.handlers)

    def _serve(self, handler: Handler, stream: Libp2pStream) -> None:
        async def run() -> None:
            try:
                await handler(stream)
            except RemoteProtocolError as exc:
                stream.conn.cut_off(exc)  # the peer broke the protocol: the connection goes
            except TransportError as exc:
                self.log.warning(
                    "libp2p_stream_failed",
                    peer=stream.conn.peer,
                    protocol=stream.protocol,
                    reason=str(exc),
                    error=type(exc).__name__,
                )
            finally:
                stream.close()

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def open_stream(self, address: str, protocol: str, node_id: str | None = None) -> Libp2pStream:
        """A stream speaking ``protocol`` to the peer at ``address`` (its connection reused or dialled)."""
        conn = await self.connect(address, node_id)
        return await conn.open_stream(protocol)

    @property
    def address(self) -> str:
        """This node's full multiaddr (with ``/p2p/``), or its bare ``/p2p/`` id when it lists none."""
        return f"{self.listen[0]}/p2p/{self.peer_id}" if self.listen else f"/p2p/{self.peer_id}"

    def identify(self, observed: Multiaddr | None) -> Identify:
        """What we tell a peer that asks ``/ipfs/id/1.0.0``."""
        return Identify(
            ED25519_KEY_PROTO_PREFIX + self.keys.identity,
            self.listen,
            SERVED_PROTOCOLS,
            observed,
            PROTOCOL_VERSION,
            AGENT_VERSION,
        )

    def protocol_factory(self) -> Connection:
        """A connection's protocol for an accepted socket (the acceptor's hand-off)."""
        self.counts["accepted"] += 1
        return Connection(self, dialer=False)

    # -- connections --------------------------------------------------------------------------------

    def _opened(self, conn: Connection) -> None:
        self._all.add(conn)

    def _up(self, conn: Connection) -> None:
        assert conn.node_id is not None
        self.peers[conn.node_id] = conn
        self.counts["connections_up"] += 1
        self.log.info(
            "libp2p_connected", peer=conn.peer, peer_id=str(conn.remote), node_id=conn.node_id, dialled=conn.dialer
        )

    def _going_away(self, conn: Connection) -> None:
        if conn.node_id is not None and self.peers.get(conn.node_id) is conn:
            del self.peers[conn.node_id]

    def _closed(self, conn: Connection) -> None:
        self._all.discard(conn)
        self._going_away(conn)

    async def connect(self, address: str, node_id: str | None = None) -> Connection:
        """The connection to ``node_id`` (reused when up: the peer's to us, or ours to ``address``), else a dial.

        Raises:
            ConnectError: the address is unusable, nobody listens, the handshake failed, the peer
                proved another peer id than the address names or another node id than ``node_id``,
                or too many dials are in progress.
            TransportTimeout: the handshake took longer than ``handshake_timeout_s``.
        """
        if node_id is not None and (conn := self._reusable(address, node_id)) is not None:
            return conn
        target = target_of(address)
        dialing = self._dialing.get(address)
        if dialing is None:
            try:
                self._backoff.check(address, asyncio.get_running_loop().time())
            except ConnectError:
                self.counts["dials_backed_off"] += 1
                raise
            if len(self._dialing) >= self.limits.max_pending_dials:
                raise ConnectError(f"libp2p {address}: {self.limits.max_pending_dials} dials are in progress already")
            dialing = asyncio.get_running_loop().create_task(
                self._dial(address, target.host, target.port, target.peer_id)
            )
            self._dialing[address] = dialing
            dialing.add_done_callback(lambda _: self._dialing.pop(address, None))
        conn = await asyncio.shield(dialing)
        if node_id is not None and conn.node_id != node_id:
            raise ConnectError(f"libp2p {address}: expected node {node_id}, the peer proved node {conn.node_id}")
        return conn

    async def _dial(self, address: str, host: str, port: int, peer_id: PeerId) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            conn = await self._dial_once(loop, address, host, port, peer_id)
        except (ConnectError, TransportTimeout) as exc:
            self._backoff.failed(address, str(exc), loop.time())
            raise
        self._backoff.succeeded(address)
        return conn

    async def _dial_once(
        self, loop: asyncio.AbstractEventLoop, address: str, host: str, port: int, peer_id: PeerId
    ) -> Connection:
        self.counts["dials"] += 1
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Connection(self, dialer=True, expected=peer_id, address=address), host, port
                ),
                self.limits.connect_timeout_s,
            )
        except TimeoutError as exc:
            raise ConnectError(f"libp2p {address}: no TCP connection within {self.limits.connect_timeout_s} s") from exc
        except OSError as exc:
            raise ConnectError(f"libp2p {address}: {exc.strerror or exc}") from exc
        try:
            return await conn.ready
        except ConnectError as exc:
            self.counts["dials_failed"] += 1
            raise ConnectError(f"libp2p {address}: {exc}") from exc

    def _reusable(self, address: str, node_id: str) -> Connection | None:
        """``node_id``'s connection up that a send to ``address`` reuses: the peer's own to us, or ours
        to ``address`` (``""``: whichever is up)."""
        conn = self.peers.get(node_id)
        if conn is None or conn.phase is not _Phase.MUX or (address and conn.address not in ("", address)):
            return None
        return conn

    def send_now(self, address: str, node_id: str, raws: list[bytes]) -> bool:
        """On the loop: send envelopes to ``node_id`` at once if a connection :meth:`connect` would reuse is
        up and nothing would make the send wait; False (nothing sent): use :meth:`send_many`."""
        conn = self._reusable(address, node_id)
        return conn is not None and conn.send_now(raws)

    async def send_many(self, address: str, node_id: str, raws: list[bytes]) -> None:
        """Send envelopes to ``node_id`` (dialling ``address`` when not connected; ``""``: only if connected).

        Raises:
            ConnectError: no connection could be had (the peer surely has nothing).
            TransportError, TransportTimeout: sending failed or stalled (the peer may have some).
        """
        if not address:
            conn = self.peers.get(node_id)
            if conn is None:
                raise ConnectError(f"libp2p: no connection with node {node_id} to reply on")
        else:
            conn = await self.connect(address, node_id)
        await conn.send_many(raws)

    async def close(self) -> None:
        """GoAway and close every connection; dials in progress are cancelled."""
        for dialing in self._dialing.values():
            dialing.cancel()
        for task in self._tasks:
            task.cancel()
        for conn in list(self._all):
            conn.close()
