"""One Noise secure session over one WebSocket: the handshake, the envelope stream, and every way it ends.

:class:`SecureLink` drives a sans-I/O :class:`~villagemesh.actors.core.secure.session.Session`
on an aiohttp WebSocket, for the server (responder) and the client (initiator) alike::

    send(raw) ──▶ Session.send_envelope ──▶ session bytes ──▶ cut into ≤ WS_FRAME_BYTES ──▶ binary WS frames
    send_many(raws) ──▶ Session.send_envelopes (they share secure frames) ──▶ the same, in one write
    binary WS frames ──▶ Session.receive_data ──┬─▶ Authenticated    → opened: the peer's node id
                                               ├─▶ EnvelopeReceived → on_message(message, raw, peer_id)
                                               └─▶ Rejected         → counted (envelopes_rejected), never delivered

Rules:

- **The stream is the protocol, WS frames only carry it.** The session frames
  its own byte stream (the Noise channel's length prefixes, then each envelope's
  4-byte length), so a sender may cut its bytes anywhere and a receiver accepts
  any cut. Frames are at most ``WS_FRAME_BYTES``; aiohttp refuses a larger one
  (``max_msg_size``, close code 1009) before buffering it. Text frames are refused.
- **Nothing before authentication.** Envelopes are sent only once the session is
  authenticated; on the receiving side only :class:`EnvelopeReceived` (sender ==
  the authenticated peer) reaches ``on_message``, with the peer id, never an address.
- **Handshake deadline.** A link not authenticated within ``handshake_timeout``
  seconds of the WebSocket opening is closed (1008): a silent or slow peer holds
  a descriptor that long at most.
- **Fatal means closed, this connection only.** A session error
  (:class:`RemoteProtocolError`: a bad handshake, a plain envelope where the
  session's header belongs, a wrong peer id, an oversized envelope length) closes
  with 1002; a text frame with 1003; a WebSocket error (aiohttp closed it
  already). Each is counted in ``rejected`` and logged as ``session_failed``
  (a write that fails because the socket went away is logged the same way but
  counted in ``write_failed``: that is no fault of the peer's bytes).
  A well-framed envelope the session refuses (:class:`Rejected`: undecodable, or
  its sender is not the peer) is counted in ``envelopes_rejected`` (the session
  logs ``envelope_rejected``) and the connection stays up: the peer is
  authenticated, its bad envelope is its bug.
- **Writes in order.** Session output and its frames are written under one lock:
  Noise nonces must reach the peer in the order they were used.
- **A failing consumer** (``on_message`` raising) is counted in
  ``callback_failed`` and logged as ``ws_callback_failed``; the connection goes
  on: the consumer's bug is not the peer's fault.

Use from the loop's thread only. Log events (fixed keys): ``session_failed``
(peer, peer_id, role, reason), ``ws_callback_failed`` (peer, peer_id, error), and
the session's own ``session_authenticated`` / ``envelope_rejected``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

from villagemesh.actors.core.secure.session import Authenticated, EnvelopeReceived, Session
from villagemesh.actors.core.secure.tcp import EnvelopeHandler
from villagemesh.errors import ConnectError, LocalProtocolError, RemoteProtocolError, TransportTimeout, VillageMeshError

__all__ = ["CLOSE_TIMEOUT_S", "MAX_MSG_SIZE", "WS_FRAME_BYTES", "AnyWebSocket", "SecureLink"]

WS_FRAME_BYTES = 64 * 1024
"""Session bytes per WS frame at most: bounds what one frame makes aiohttp buffer; the session re-frames anyway."""

MAX_MSG_SIZE = WS_FRAME_BYTES + 1
"""aiohttp's ``max_msg_size`` for our WebSockets: it refuses a message of exactly its limit too."""

CLOSE_TIMEOUT_S = 2.0
"""How long a closing side waits for the peer's close frame before dropping the socket (a LAN peer takes ms)."""

_CLOSE_REASON_BYTES = 120
"""A close reason shares a 125-byte control frame with the 2-byte code."""

AnyWebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse
"""The server's or the client's end of a WebSocket."""


class SecureLink:
    """One :class:`Session` on one open WebSocket (either role); use from the loop's thread only.

    Args:
        ws: the open WebSocket (server side: prepared; client side: connected).
        session: a fresh :class:`Session` (initiator on the client, responder on the server).
        address: the peer's address for logs and errors (``host:port`` or the URL).
        on_message: called with every envelope from the authenticated peer.
        counts: the counters to update (the server's or the client's).
        log: a structlog-shaped logger.
        handshake_timeout: seconds from now until the session must be authenticated.
    """

    def __init__(
        self,
        ws: AnyWebSocket,
        session: Session,
        *,
        address: str,
        on_message: EnvelopeHandler,
        counts: Counter[str],
        log: Any,
        handshake_timeout: float,
    ) -> None:
        self.ws = ws
        self.session = session
        self.address = address
        self.on_message = on_message
        self.counts = counts
        self.log = log
        self.handshake_timeout = handshake_timeout
        self.opened: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        """Resolves to the peer's node id once authenticated; fails with the error that ended the handshake."""
        self.error: VillageMeshError | None = None
        """What ended the link, if it failed."""
        self._lock = asyncio.Lock()

    @property
    def peer_id(self) -> str | None:
        """The peer's node id, once authenticated (None before, and after a failure)."""
        return self.session.peer_id if self.session.authenticated else None

    @property
    def closed(self) -> bool:
        """True once the WebSocket is closed or the link failed: no more sends."""
        return self.ws.closed or self.error is not None

    async def run(self) -> None:
        """Open the session and read the WebSocket until it ends; every failure is handled here, none raised."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.handshake_timeout
        try:
            if not await self._flush():
                return
            while True:
                timeout = None
                if not self.session.authenticated:
                    timeout = deadline - loop.time()
                    if timeout <= 0:  # aiohttp reads a zero timeout as "none"
                        await self._handshake_timed_out()
                        return
                try:
                    frame = await self.ws.receive(timeout=timeout)
                except TimeoutError:
                    await self._handshake_timed_out()
                    return
                if not await self._frame(frame):
                    return
        finally:
            self._settle(self.error or ConnectError("the WebSocket closed during the secure handshake"))

    async def send(self, raw: bytes) -> None:
        """Send the encoded envelope ``raw`` (its sender must be our node id) to the authenticated peer.

        Raises:
            ConnectError: the link is closed, or the write failed (the link is then closed).
            LocalProtocolError: ``raw`` is not a valid envelope of ours, or the session cannot send any more.
        """
        if self.closed:
            raise ConnectError(f"the WebSocket to {self.address} is closed")
        async with self._lock:
            try:
                data = self.session.send_envelope(raw)
            except LocalProtocolError as exc:
                if self.session.failed:  # nonce exhaustion: this session is over
                    await self._fail(exc, aiohttp.WSCloseCode.POLICY_VIOLATION)
                raise
            if not await self._write(data):
                raise ConnectError(f"the WebSocket to {self.address} closed while sending") from self.error
        self.counts["sent"] += 1

    async def send_many(self, raws: list[bytes]) -> dict[int, str]:
        """Send the encoded envelopes ``raws`` in one write (they share secure frames); by index, why each
        one not ours to send was left out (the others are sent).

        Raises:
            ConnectError: the link is closed, or the write failed (the link is then closed): none is sent.
            LocalProtocolError: the session cannot send any more.
        """
        if self.closed:
            raise ConnectError(f"the WebSocket to {self.address} is closed")
        async with self._lock:
            try:
                data, refused = self.session.send_envelopes(raws)
            except LocalProtocolError as exc:
                if self.session.failed:  # nonce exhaustion: this session is over
                    await self._fail(exc, aiohttp.WSCloseCode.POLICY_VIOLATION)
                raise
            if not await self._write(data):
                raise ConnectError(f"the WebSocket to {self.address} closed while sending") from self.error
        self.counts["sent"] += len(raws) - len(refused)
        return refused

    async def close(self, code: int = aiohttp.WSCloseCode.OK, reason: str = "") -> None:
        """Close the WebSocket (waits at most the WebSocket's close timeout for the peer's answer)."""
        await self.ws.close(code=code, message=_close_reason(reason))

    # -- internals ------------------------------------------------------------------------------

    async def _frame(self, frame: aiohttp.WSMessage) -> bool:
        """Handle one received frame; False once the link is over."""
        if frame.type is aiohttp.WSMsgType.BINARY:
            return await self._feed(frame.data)
        if frame.type is aiohttp.WSMsgType.TEXT:
            error = RemoteProtocolError("a text frame: this WebSocket carries a binary secure session")
            await self._fail(error, aiohttp.WSCloseCode.UNSUPPORTED_DATA)
            return False
        if frame.type is aiohttp.WSMsgType.ERROR:  # aiohttp has closed the WebSocket already (1009, 1002, ...)
            self._failed(RemoteProtocolError(f"WebSocket error: {type(frame.data).__name__}: {frame.data}"))
        return False  # CLOSE, CLOSING, CLOSED: the peer or we ended it

    async def _feed(self, data: bytes) -> bool:
        try:
            events = self.session.receive_data(data)
        except RemoteProtocolError as exc:
            await self._fail(exc, aiohttp.WSCloseCode.PROTOCOL_ERROR)
            return False
        if not await self._flush():
            return False
        for event in events:
            if isinstance(event, Authenticated):
                self.counts["authenticated"] += 1
                self._settle(event.peer_id)
            elif isinstance(event, EnvelopeReceived):
                self.counts["received"] += 1
                self._deliver(event)
            else:  # Rejected: the session logged it; never delivered
                self.counts["envelopes_rejected"] += 1
        return True

    def _deliver(self, event: EnvelopeReceived) -> None:
        peer_id = self.session.peer_id
        assert peer_id is not None  # envelopes come only after Authenticated
        try:
            self.on_message(event.message, event.raw, peer_id)
        except Exception as exc:  # noqa: BLE001 - the consumer's bug must not cut the peer off
            self.counts["callback_failed"] += 1
            self.log.error(
                "ws_callback_failed", peer=self.address, peer_id=peer_id, error=f"{type(exc).__name__}: {exc}"
            )

    async def _flush(self) -> bool:
        """Write pending handshake bytes; False if the WebSocket broke."""
        async with self._lock:
            return await self._write(self.session.data_to_send())

    async def _write(self, data: bytes) -> bool:
        """Write ``data`` in frames of at most WS_FRAME_BYTES (caller holds the lock); False if the WebSocket broke."""
        try:
            for start in range(0, len(data), WS_FRAME_BYTES):
                await self.ws.send_bytes(data[start : start + WS_FRAME_BYTES])
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            # aiohttp raises ConnectionResetError / ClientConnectionResetError on a closing socket.
            error = ConnectError(f"write failed: {type(exc).__name__}: {exc}")
            await self._fail(error, aiohttp.WSCloseCode.GOING_AWAY, count="write_failed")
            return False
        return True

    async def _handshake_timed_out(self) -> None:
        error = TransportTimeout(f"secure handshake not complete within {self.handshake_timeout} s")
        await self._fail(error, aiohttp.WSCloseCode.POLICY_VIOLATION)

    async def _fail(self, error: VillageMeshError, code: int, *, count: str = "rejected") -> None:
        self._failed(error, count=count)
        await self.close(code, str(error))

    def _failed(self, error: VillageMeshError, *, count: str = "rejected") -> None:
        """Record the first fatal error: counted under ``count``, logged, and the handshake's waiter failed."""
        if self.error is not None:
            return
        self.error = error
        self.counts[count] += 1
        self.log.warning(
            "session_failed",
            peer=self.address,
            peer_id=self.session.peer_id,
            role=self.session.role,
            reason=str(error),
        )
        self._settle(error)

    def _settle(self, outcome: str | VillageMeshError) -> None:
        if self.opened.done():
            return
        if isinstance(outcome, str):
            self.opened.set_result(outcome)
        else:
            self.opened.set_exception(outcome)
            self.opened.exception()  # retrieved here: on the server nobody awaits it


def _close_reason(reason: str) -> bytes:
    """``reason`` cut to fit a close frame, on a character boundary (a close reason must be valid UTF-8)."""
    return reason.encode()[:_CLOSE_REASON_BYTES].decode(errors="ignore").encode()
