"""Authenticated sessions over TCP: the acceptor's SECURE route and the dialler, on one asyncio Protocol.

:class:`SecureProtocol` drives a :class:`~.session.Session` on one connection;
both roles use it::

    dialler                                               node's acceptor port
    dial(host, port, expected_peer=…) ──TCP──▶ AcceptorServer ──sniff "VMSC"──▶ Route.SECURE
      SecureProtocol(Session.initiator)                     route_in_loop(Route.SECURE, responder_factory(…))
      │ header, Noise XX ────────────────────────────────▶ SecureProtocol(Session.responder)
      │◀──────────────────────────────────────────────────  (fed the peeked bytes first)
      ▼ Authenticated: dial() returns a SecureConnection     ▼ Authenticated: on_open(SecureConnection)
      send_envelope(raw) ◀══════ envelopes both ways ══════▶ on_envelope(message, raw, peer_id)

Rules:

- **Handshake deadline.** A connection whose handshake has not completed within
  ``handshake_timeout`` (``HANDSHAKE_TIMEOUT_S`` = 5 s by default) is aborted,
  on both sides: a silent or slow peer holds a descriptor for that long at most.
- **Fatal means closed.** A session error (:class:`RemoteProtocolError`), the
  deadline (:class:`TransportTimeout`), a socket error (:class:`ConnectError`)
  or an ``on_open``/``on_envelope`` callback that raises aborts the connection
  and logs ``session_failed``; each error names the peer's address.
- **Callbacks** run on the loop and must only hand data on (a queue, a
  ``call_soon_threadsafe``, a bus send). ``on_envelope(message, raw, peer_id)``
  gets only envelopes whose sender is ``peer_id``; ``on_open(connection)`` once
  authenticated (the dialler gets the connection from :func:`dial` instead);
  ``on_close(connection, error_or_None)`` exactly once when an authenticated
  connection ends (one that raises is logged as ``session_callback_failed``).
  A connection that never authenticated calls neither.
- :class:`SecureConnection` is used from the loop's thread only (like the
  asyncio transport it wraps).

Log events (structlog, fixed keys): ``session_failed`` (peer, peer_id, role,
reason), ``session_closed`` (peer, peer_id, role; debug), ``session_callback_failed``
(peer, peer_id, role, reason), plus the session's own.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import structlog
from nacl.signing import SigningKey

from villagemesh.actors.core.handoff import peer_label
from villagemesh.actors.core.secure.session import Authenticated, EnvelopeReceived, Session
from villagemesh.errors import (
    ConfigError,
    ConnectError,
    LocalProtocolError,
    RemoteProtocolError,
    TransportTimeout,
    VillageMeshError,
)
from villagemesh.protocols.envelope import Message

__all__ = [
    "HANDSHAKE_TIMEOUT_S",
    "EnvelopeHandler",
    "SecureConnection",
    "SecureProtocol",
    "dial",
    "responder_factory",
]

HANDSHAKE_TIMEOUT_S = 5.0
"""Three messages on a LAN take milliseconds; 5 s without completing means a stuck or hostile peer."""

EnvelopeHandler = Callable[[Message, bytes, str], None]
"""``on_envelope(message, raw, peer_id)``: an envelope from the authenticated peer ``peer_id``."""

OpenHandler = Callable[["SecureConnection"], None]
"""``on_open(connection)``: the handshake completed."""

CloseHandler = Callable[["SecureConnection", VillageMeshError | None], None]
"""``on_close(connection, error)``: an open connection ended (``None``: closed cleanly)."""


class SecureConnection:
    """An authenticated connection: send envelopes to ``peer_id``; use from the loop's thread only."""

    def __init__(self, protocol: SecureProtocol, peer_id: str, identity: bytes) -> None:
        self._protocol = protocol
        self.peer_id = peer_id
        """The peer's node id, proven by the handshake."""
        self.identity = identity
        """The peer's Ed25519 public key."""

    @property
    def address(self) -> str:
        """The peer's ``host:port``."""
        return self._protocol.peer

    @property
    def session(self) -> Session:
        """The underlying session (counters, handshake hash)."""
        return self._protocol.session

    @property
    def counts(self) -> Counter[str]:
        """The session's counters: ``received``, ``sent``, ``rejected.sender``, ``rejected.envelope``."""
        return self._protocol.session.counts

    @property
    def is_closing(self) -> bool:
        """True once the connection is closing or closed."""
        return self._protocol.is_closing

    def send_envelope(self, raw: bytes) -> None:
        """Queue the encoded envelope ``raw`` for the peer (its sender must be our node id).

        Raises:
            ConnectError: the connection is closing or closed.
            LocalProtocolError: ``raw`` is not a valid envelope of ours, or
                the session cannot send any more (it is then closed).
        """
        self._protocol.send_envelope(raw)

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark.

        Raises:
            ConnectError: the connection closed while waiting.
        """
        await self._protocol.drain()

    def close(self) -> None:
        """Close after the queued bytes are written."""
        self._protocol.close()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed."""
        await self._protocol.closed.wait()


class SecureProtocol(asyncio.Protocol):
    """Runs one :class:`Session` on one stream connection (either role).

    Args:
        session: a fresh :class:`Session` (initiator for dialling, responder for accepting).
        on_envelope: see :data:`EnvelopeHandler`.
        on_open: called once the peer is authenticated.
        on_close: called once when an authenticated connection ends.
        handshake_timeout: seconds from ``connection_made`` to authentication.
        log: a structlog-shaped logger (default ``villagemesh.secure``).
    """

    def __init__(
        self,
        session: Session,
        *,
        on_envelope: EnvelopeHandler,
        on_open: OpenHandler | None = None,
        on_close: CloseHandler | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
        log: Any = None,
    ) -> None:
        if not handshake_timeout > 0:
            raise ConfigError(f"handshake_timeout must be > 0 seconds, got {handshake_timeout!r}")
        self.session = session
        self.on_envelope = on_envelope
        self.on_open = on_open
        self.on_close = on_close
        self.handshake_timeout = handshake_timeout
        self.log = log if log is not None else structlog.get_logger("villagemesh.secure")
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown"
        """The peer's ``host:port``, once connected."""
        self.connection: SecureConnection | None = None
        """Set once authenticated."""
        self.closed = asyncio.Event()
        """Set when the connection is lost."""
        self._error: VillageMeshError | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[SecureConnection] | None = None
        self._writable: asyncio.Future[None] | None = None

    # -- asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # stream connections only
        self.peer = peer_label(transport.get_extra_info("peername"))[1]
        self._timer = asyncio.get_running_loop().call_later(self.handshake_timeout, self._handshake_timed_out)
        self._write(self.session.data_to_send())

    def data_received(self, data: bytes) -> None:
        if self.is_closing:
            return
        try:
            events = self.session.receive_data(data)
        except RemoteProtocolError as exc:
            self._fail(RemoteProtocolError(f"secure session with {self.peer}: {exc}"), exc)
            return
        self._write(self.session.data_to_send())
        for event in events:
            if self.is_closing:
                return
            if isinstance(event, Authenticated):
                self._opened(event)
            elif isinstance(event, EnvelopeReceived):
                self._deliver(event)
            # Rejected: the session counted and logged it; nothing is delivered.

    def eof_received(self) -> bool:
        return False  # no half-open sessions: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._error is None and exc is not None:
            self._error = ConnectError(f"secure session with {self.peer}: {exc}")
        waiter_error = self._error or ConnectError(f"secure session with {self.peer}: closed during the handshake")
        self._settle_waiter(error=waiter_error)
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(ConnectError(f"secure session with {self.peer}: closed"))
            self._writable.exception()  # retrieved here: drain() may not be waiting
        self.closed.set()
        if self.connection is None:
            return
        self.log.debug("session_closed", peer=self.peer, peer_id=self.session.peer_id, role=self.session.role)
        if self.on_close is not None:
            try:
                self.on_close(self.connection, self._error)
            except Exception as exc:  # noqa: BLE001 - the connection is gone already; the loop must go on
                self.log.error(
                    "session_callback_failed",
                    peer=self.peer,
                    peer_id=self.session.peer_id,
                    role=self.session.role,
                    reason=f"on_close raised {exc!r}",
                )

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- used by dial() and SecureConnection ------------------------------------------------------

    @property
    def is_closing(self) -> bool:
        """True once the transport is closing (or never opened)."""
        return self.transport is None or self.transport.is_closing()

    def opened(self) -> asyncio.Future[SecureConnection]:
        """A future for the authenticated connection; it fails with the error that ended the handshake."""
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
            if self.connection is not None:
                self._waiter.set_result(self.connection)
            elif self.closed.is_set() or self._error is not None:
                self._waiter.set_exception(self._error or ConnectError(f"secure session with {self.peer}: closed"))
        return self._waiter

    def send_envelope(self, raw: bytes) -> None:
        """See :meth:`SecureConnection.send_envelope`."""
        if self.is_closing:
            raise ConnectError(f"secure session with {self.session.peer_id} at {self.peer} is closed")
        try:
            data = self.session.send_envelope(raw)
        except LocalProtocolError as exc:
            if self.session.failed:
                self._fail(exc, exc)
            raise
        self._write(data)

    async def drain(self) -> None:
        """See :meth:`SecureConnection.drain`."""
        if self._writable is not None and not self._writable.done():
            await asyncio.shield(self._writable)
        if self.closed.is_set():
            raise ConnectError(f"secure session with {self.peer}: closed")

    def close(self) -> None:
        """Close after the queued bytes are written."""
        if self.transport is not None:
            self.transport.close()

    # -- internals ------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None:
            self.transport.write(data)

    def _opened(self, event: Authenticated) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.connection = SecureConnection(self, event.peer_id, event.identity)
        self._settle_waiter(result=self.connection)
        if self.on_open is not None:
            try:
                self.on_open(self.connection)
            except Exception as exc:  # noqa: BLE001 - a failing consumer loses this connection, not the loop
                self._fail(ConnectError(f"secure session with {self.peer}: on_open raised {exc!r}"), exc)

    def _deliver(self, event: EnvelopeReceived) -> None:
        peer_id = self.session.peer_id
        assert peer_id is not None  # envelopes come only after Authenticated
        try:
            self.on_envelope(event.message, event.raw, peer_id)
        except Exception as exc:  # noqa: BLE001 - a failing consumer loses this connection, not the loop
            self._fail(ConnectError(f"secure session with {self.peer}: on_envelope raised {exc!r}"), exc)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        error = TransportTimeout(
            f"secure session with {self.peer}: handshake not complete within {self.handshake_timeout} s"
        )
        self._fail(error, error)

    def _fail(self, error: VillageMeshError, cause: BaseException) -> None:
        if error is not cause:
            error.__cause__ = cause
        if self._error is None:
            self._error = error
        self.log.warning(
            "session_failed", peer=self.peer, peer_id=self.session.peer_id, role=self.session.role, reason=str(error)
        )
        self._settle_waiter(error=error)
        if self.transport is not None:
            self.transport.abort()

    def _settle_waiter(self, *, result: SecureConnection | None = None, error: VillageMeshError | None = None) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if result is not None:
            waiter.set_result(result)
        elif error is not None:
            waiter.set_exception(error)


def responder_factory(
    *,
    static_key: bytes,
    signing_key: SigningKey,
    on_envelope: EnvelopeHandler,
    on_open: OpenHandler | None = None,
    on_close: CloseHandler | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
    log: Any = None,
) -> Callable[[], SecureProtocol]:
    """A protocol factory for the acceptor's SECURE route: ``server.route_in_loop(Route.SECURE, factory)``.

    Each call makes a responder :class:`SecureProtocol` with a fresh :class:`Session`
    accepting any authenticated peer. Also usable with ``loop.create_server``.

    Raises:
        ConfigError: a key of the wrong size or type, or a non-positive timeout (checked now, not per connection).
    """
    Session.responder(static_key, signing_key)  # validates the keys once, here
    if not handshake_timeout > 0:
        raise ConfigError(f"handshake_timeout must be > 0 seconds, got {handshake_timeout!r}")

    def make() -> SecureProtocol:
        return SecureProtocol(
            Session.responder(static_key, signing_key, log=log),
            on_envelope=on_envelope,
            on_open=on_open,
            on_close=on_close,
            handshake_timeout=handshake_timeout,
            log=log,
        )

    return make


async def dial(
    host: str,
    port: int,
    *,
    static_key: bytes,
    signing_key: SigningKey,
    expected_peer: str | None,
    on_envelope: EnvelopeHandler,
    on_close: CloseHandler | None = None,
    timeout: float = HANDSHAKE_TIMEOUT_S,
    log: Any = None,
) -> SecureConnection:
    """Connect to ``host:port``, run the handshake, and return the authenticated connection.

    Args:
        expected_peer: the node id we mean to reach (None: whoever answers).
        on_envelope: called for every envelope the peer sends.
        on_close: called once when the connection ends.
        timeout: seconds for the TCP connect and the handshake together.

    Raises:
        ConfigError: bad keys, ``expected_peer`` not a node id, a non-positive timeout.
        ConnectError: the address cannot be reached, or the peer closed during the handshake.
        TransportTimeout: no connection, or no completed handshake, within ``timeout``.
        RemoteProtocolError: the peer broke the protocol or is not ``expected_peer``.
    """
    if not timeout > 0:
        raise ConfigError(f"timeout must be > 0 seconds, got {timeout!r}")
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    session = Session.initiator(static_key, signing_key, expected_peer=expected_peer, log=log)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    protocol = SecureProtocol(session, on_envelope=on_envelope, on_close=on_close, handshake_timeout=timeout, log=log)
    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: protocol, host, port)
    except TimeoutError as exc:
        raise TransportTimeout(f"secure dial of {where}: no connection within {timeout} s") from exc
    except OSError as exc:
        raise ConnectError(f"secure dial of {where}: {exc}") from exc
    try:
        async with asyncio.timeout_at(deadline):
            return await protocol.opened()
    except TimeoutError as exc:
        raise TransportTimeout(f"secure dial of {where}: handshake not complete within {timeout} s") from exc
    finally:
        if protocol.connection is None and protocol.transport is not None:
            protocol.transport.abort()  # failed, timed out or cancelled: nothing half-open is left behind
