"""The WebSocket actor: owns the aiohttp server and client on its own loop thread.

Thin by design (the decisions live in :mod:`.state`, the I/O in :mod:`.transport` and :mod:`.link`)::

    acceptor ──ConnectionHandedOff(fd)──▶ handle ──▶ adopt_handed_off ──▶ aiohttp (on the loop)
    secure session ──envelopes from peer_id (loop)──▶ post ──▶ on_loop_message ──bus──▶ deliver_to: Received
    retrier ──Transmits──▶ handle_batch ──▶ run_on_loop(client.send_many, expected_peer=peer_id) ──then──▶
                                            reply_to: TransmitResult (a success only if report_success)
    anyone ──SendEnvelope──▶ handle ──▶ run_on_loop(client.send) ──then──▶ reply_to: EnvelopeSent | SendFailed

It speaks the transport contract (:mod:`villagemesh.actors.core.transport`): the
retrier's ``Transmit`` is answered with a ``TransmitResult`` (a refused or
failed connection is *retryable*: the peer surely did not get the bytes; so is
a peer that authenticates as another node id than ``Transmit.peer_id``, with
both ids in the error; a timeout is not, since it may have), and every inbound
envelope goes to ``deliver_to`` as ``Received(remote=<the peer's node id>)``,
only when its sender is the peer the secure session authenticated.
``SendEnvelope`` is the direct, unreliable client API (any peer may answer at the URL).

Nothing blocks the actor on the network: a send is started on the loop and
its outcome comes back to the actor thread (see :mod:`~villagemesh.actors.core.loopactor`).

Batches, both ways, never waiting to fill one: every Transmit waiting in the
mailbox is taken in one turn, and those for one peer address go to the loop in
one hop and out in one write (their envelopes share secure frames, cut at the
Noise frame bound); every envelope the loop decoded in one pass of its
callbacks comes back to the actor in one hop (``call_soon``, no timer) and goes
on to ``deliver_to`` as one bus frame.

Config (``ctx.config``): ``keys`` (the node's :class:`~villagemesh.actors.core.secure.keys.NodeKeys`;
without it fresh keys are generated and ``ws_keys_generated`` (node_id, reason) is logged:
the transport never runs unauthenticated), ``deliver_to`` (actor name for incoming
envelopes; without it they are counted and dropped), ``node_id`` (optional; must
be the keys' node id), ``connect_timeout`` / ``send_timeout`` / ``handshake_timeout``
(seconds, default 5), ``http`` (a callable given the aiohttp app before it starts, to add the
node's read-only HTTP routes on this port: the status endpoint, the dashboard).

Metrics (the bus's, :mod:`villagemesh.actors.core.metrics`): ``transmit_ok`` (reported
successes only) and ``transmit_failed`` count the outcomes of ``Transmit``.
"""

from __future__ import annotations

from typing import Any

from villagemesh.actors.core.base import Request
from villagemesh.actors.core.bus import Sender
from villagemesh.actors.core.loopactor import LOOP_CALL_TIMEOUT_S, EnvelopeTransportActor
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.core.secure.tcp import HANDSHAKE_TIMEOUT_S
from villagemesh.actors.core.transport import (
    ConnectionHandedOff,
    Discover,
    Discovered,
    Transmit,
    TransmitMany,
    TransmitResult,
    group_transmits,
)
from villagemesh.actors.websocket.messages import (
    GetWebSocketStatus,
    SendEnvelope,
    SendFailed,
    WebSocketStatus,
)
from villagemesh.actors.websocket.state import TRANSPORT, Via, send_outcome, transmit_outcome, via
from villagemesh.actors.websocket.transport import WebSocketClient, WebSocketServer
from villagemesh.errors import BusError, ConfigError, RemoteProtocolError
from villagemesh.protocols.envelope import Message, decode_message, encode_message

__all__ = ["TRANSPORT", "WebSocketActor", "config_keys", "send_envelope", "websocket_status"]



def config_keys(config: dict[str, Any], log: Any) -> NodeKeys:
    """The actor config's ``keys``, or fresh ones (logged as ``ws_keys_generated``: never silently).

    Raises:
        ConfigError: ``keys`` is not a NodeKeys, or ``node_id`` is given and is not the keys' node id.
    """
    keys = config.get("keys")
    node_id = config.get("node_id")
    if keys is None:
        if node_id is not None:
            raise ConfigError(f"websocket config names node_id {node_id!r} but gives no keys to prove it")
        keys = NodeKeys.generate()
        log.warning(
            "ws_keys_generated",
            node_id=keys.node_id,
            reason="no keys in the config: this transport authenticates as a fresh, ephemeral node id",
        )
        return keys
    if not isinstance(keys, NodeKeys):
        raise ConfigError(f"websocket config keys must be NodeKeys, got {type(keys).__name__}")
    if node_id is not None and node_id != keys.node_id:
        raise ConfigError(f"websocket config node_id {node_id!r} is not the keys' node id {keys.node_id}")
    return keys


class WebSocketActor(EnvelopeTransportActor):
    """Serves WebSockets handed off by the acceptor; sends envelopes to peers' WebSockets."""

    transport = TRANSPORT

    batch_limit = 1024

    def on_start(self) -> None:
        config = self.ctx.config
        self.start_inbound(config.get("deliver_to"))
        self.start_io()
        keys = config_keys(config, self.io_log)
        handshake_timeout = float(config.get("handshake_timeout", HANDSHAKE_TIMEOUT_S))
        self.server = WebSocketServer(
            self.envelope_received,
            keys,
            handshake_timeout=handshake_timeout,
            log=self.io_log,
            install=config.get("http"),
        )
        self.client = WebSocketClient(
            self.envelope_received,
            keys,
            connect_timeout=float(config.get("connect_timeout", 5.0)),
            send_timeout=float(config.get("send_timeout", 5.0)),
            handshake_timeout=handshake_timeout,
            log=self.io_log,
        )
        self.io_loop.call(self.server.start(), LOOP_CALL_TIMEOUT_S)

    async def io_shutdown(self) -> None:
        """Close outbound WebSockets, then the server's connections."""
        for part in (getattr(self, "client", None), getattr(self, "server", None)):
            if part is not None:
                await part.close()

    # -- bus messages -------------------------------------------------------------------------------

    def handle(self, msg: Any) -> Any:
        """:class:`ConnectionHandedOff`, :class:`SendEnvelope`, :class:`GetWebSocketStatus`."""
        if isinstance(msg, ConnectionHandedOff):
            self.adopt_handed_off(msg, self.server.protocol_factory)
            return None
        if isinstance(msg, Transmit | TransmitMany):
            self._start_grouped([msg])
            return None
        if isinstance(msg, SendEnvelope):
            self._start_send(msg)
            return None
        if isinstance(msg, Discover):
            # Peers reachable over WebSocket are found by the LAN actor (beacons and probes).
            self.tell(msg.reply_to, Discovered(msg.round, TRANSPORT, (), ()))
            return None
        if isinstance(msg, GetWebSocketStatus):
            return self.io_loop.call(self._statistics(), LOOP_CALL_TIMEOUT_S)
        return super().handle(msg)

    def _start_send(self, request: SendEnvelope) -> None:
        try:
            message = decode_message(request.envelope)
        except RemoteProtocolError as exc:
            self._reply(request, SendFailed(request.url, b"", "RemoteProtocolError", str(exc)))
            return

        def then(_: None, error: BaseException | None) -> None:
            self._reply(request, send_outcome(request, message.id, error))  # a bug is raised for the supervisor

        self.run_on_loop(self.client.send(request.url, request.envelope), then)

    def handle_batch(self, batch: list[Request]) -> None:
        """Every message waiting: the Transmits to one peer address go out together, the rest one by one."""
        sends: list[Transmit | TransmitMany] = []
        for request in batch:
            msg = request.msg
            if isinstance(msg, Transmit | TransmitMany):
                sends.append(msg)
                continue
            answer = self.handle(msg)
            if request.token is not None:
                request.token.reply(answer)
        if sends:
            self._start_grouped(sends)

    def _start_grouped(self, sends: list[Transmit | TransmitMany]) -> None:
        """Start ``sends`` in order, one write per peer address."""
        for group in group_transmits(sends).values():
            self._start_transmits(group)

    def _start_transmits(self, requests: list[Transmit]) -> None:
        """Send the envelopes of ``requests`` (one peer, one address) in one write on the loop."""

        def then(refused: dict[int, str] | None, error: BaseException | None) -> None:
            for index, request in enumerate(requests):
                reason = (refused or {}).get(index) if error is None else None
                if reason is not None:
                    outcome = TransmitResult(
                        request.message_id, TRANSPORT, request.peer_id, False, False, f"bad envelope: {reason}"
                    )
                elif error is None and not request.report_success:
                    continue
                else:
                    outcome = transmit_outcome(request, error)  # a bug is raised for the supervisor
                self.metrics.count("transmit_ok" if outcome.ok else "transmit_failed")
                self._tell_outcome(request.reply_to, outcome)

        first = requests[0]
        envelopes = [r.envelope for r in requests]
        if via(first) is Via.SERVER:
            sending = self.server.send_many(first.peer_id, envelopes)
        else:
            sending = self.client.send_many(first.address, envelopes, expected_peer=first.peer_id)
        # A refused envelope is a result to post even when successes are not reported.
        self.run_on_loop(sending, then, post_success=first.report_success, post_if=bool)

    def _tell_outcome(self, to: str, outcome: object) -> None:
        try:
            self.tell(to, outcome)
        except BusError as exc:
            self.io_log.warning("send_outcome_undeliverable", to=to, reason=str(exc))

    def _reply(self, request: SendEnvelope, outcome: object) -> None:
        if request.reply_to is None:
            return
        try:
            self.tell(request.reply_to, outcome)
        except BusError as exc:
            self.io_log.warning("send_outcome_undeliverable", to=request.reply_to, reason=str(exc))

    async def _statistics(self) -> WebSocketStatus:
        return WebSocketStatus(dict(self.server.counts), dict(self.client.counts))


def send_envelope(
    client: Sender, message: Message, url: str, *, name: str = "websocket", reply_to: str | None = None
) -> None:
    """Ask the WebSocket actor to send ``message`` to ``url``; the outcome is told to ``reply_to``."""
    client.tell(name, SendEnvelope(url, encode_message(message), reply_to))


def websocket_status(client: Sender, name: str = "websocket", *, timeout: float = 5.0) -> WebSocketStatus:
    """The WebSocket actor's counters."""
    reply = client.ask(name, GetWebSocketStatus(), timeout=timeout)
    if not isinstance(reply, WebSocketStatus):
        raise BusError(f"websocket actor {name!r} answered {reply!r}")
    return reply
