"""The libp2p actor: a real libp2p peer on the node's single port, speaking the transport contract.

Thin by design (the decisions live in :mod:`.state`, the connections in :mod:`.host`)::

    acceptor ──ConnectionHandedOff(fd, route libp2p)──▶ handle ──▶ adopt_handed_off ──▶ Connection (loop)
    Connection ──envelopes from node_id (loop)──▶ post ──▶ on_loop_message ──bus──▶ deliver_to: Received
    retrier ──Transmits──▶ handle_batch ──▶ run_on_loop(host.send_many) ──then──▶ reply_to: TransmitResult
    sweeper ──Discover──▶ handle ──▶ Discovered

A Transmit's address is the peer's multiaddr ``/ip4/…/tcp/…/p2p/<peer id>`` from its
signed announce (the registry's ``libp2p`` addresses), or
:data:`~villagemesh.actors.core.transport.REPLY_ADDRESS` for "on the connection the peer
has open with us". Its outcome follows the kit's rule
(:func:`~villagemesh.actors.core.transport.transmit_outcome`): cannot connect, handshake
refused, another peer id or node id than asked: retryable; a timeout or a connection lost
while sending: not (the peer may have the bytes).

Config (``ctx.config``): ``keys`` (the node's
:class:`~villagemesh.actors.core.secure.keys.NodeKeys`: its libp2p identity; required),
``deliver_to`` (actor name for incoming envelopes; without it they are counted and
dropped), ``listen`` (this node's multiaddr without ``/p2p/``, for identify and the status),
``limits`` (:class:`~.state.Libp2pLimits`), ``handshake_deadline_s`` (the adopted
connection's first multistream line, :meth:`~villagemesh.actors.core.loopactor.LoopActor.adopt_handed_off`).

Metrics: ``transmit_ok`` (reported successes only) and ``transmit_failed``.
"""

from __future__ import annotations

from typing import Any

from villagemesh.actors.core.base import Request
from villagemesh.actors.core.bus import Sender
from villagemesh.actors.core.loopactor import LOOP_CALL_TIMEOUT_S, EnvelopeTransportActor
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.core.transport import (
    ConnectionHandedOff,
    Discover,
    Discovered,
    Transmit,
    transmit_outcome,
)
from villagemesh.actors.libp2p.host import Libp2pHost
from villagemesh.actors.libp2p.messages import GetLibp2pStatus, Libp2pStatus
from villagemesh.actors.libp2p.state import TRANSPORT, Libp2pLimits
from villagemesh.errors import BusError, ConfigError

__all__ = ["TRANSPORT", "Libp2pActor", "libp2p_status"]


class Libp2pActor(EnvelopeTransportActor):
    """Serves libp2p connections handed off by the acceptor; dials peers' multiaddrs."""

    transport = TRANSPORT

    batch_limit = 1024

    def on_start(self) -> None:
        config = self.ctx.config
        keys = config.get("keys")
        if not isinstance(keys, NodeKeys):
            raise ConfigError(f"libp2p config keys must be the node's NodeKeys, got {type(keys).__name__}")
        limits = config.get("limits") or Libp2pLimits()
        if not isinstance(limits, Libp2pLimits):
            raise ConfigError(f"libp2p limits must be Libp2pLimits, got {limits!r}")
        self.start_inbound(config.get("deliver_to"))
        self.start_io()

        async def make() -> Libp2pHost:
            return Libp2pHost(keys, self.envelope_received, listen=config.get("listen"), limits=limits, log=self.io_log)

        self.host: Libp2pHost = self.io_loop.call(make(), LOOP_CALL_TIMEOUT_S)
        self.io_log.info("libp2p_listening", address=self.host.address, peer_id=str(self.host.peer_id))

    async def io_shutdown(self) -> None:
        """GoAway and close every connection."""
        host = getattr(self, "host", None)
        if host is not None:
            await host.close()

    # -- bus messages -------------------------------------------------------------------------------

    def handle(self, msg: Any) -> Any:
        """:class:`ConnectionHandedOff`, :class:`Transmit`, :class:`Discover`, :class:`GetLibp2pStatus`."""
        if isinstance(msg, ConnectionHandedOff):
            self.adopt_handed_off(msg, self.host.protocol_factory)
            return None
        if isinstance(msg, Transmit):
            self._start_transmits([msg])
            return None
        if isinstance(msg, Discover):
            self.tell(msg.reply_to, Discovered(msg.round, TRANSPORT, (), ()))
            return None
        if isinstance(msg, GetLibp2pStatus):
            return self.io_loop.call(self._status(), LOOP_CALL_TIMEOUT_S)
        return super().handle(msg)

    def handle_batch(self, batch: list[Request]) -> None:
        """Every message waiting: the Transmits to one peer go out in one write, the rest one by one."""
        per_peer: dict[tuple[str, str, bool], list[Transmit]] = {}
        for request in batch:
            if isinstance(request.msg, Transmit):
                t = request.msg
                per_peer.setdefault((t.peer_id, t.address, t.report_success), []).append(t)
            else:
                answer = self.handle(request.msg)
                if request.token is not None:
                    request.token.reply(answer)
        for transmits in per_peer.values():
            self._start_transmits(transmits)

    def _start_transmits(self, requests: list[Transmit]) -> None:
        """The envelopes of ``requests`` (one peer, one address) on the peer's connection, in one write."""
        first = requests[0]

        def then(_: None, error: BaseException | None) -> None:
            for request in requests:
                if error is None and not request.report_success:
                    continue
                outcome = transmit_outcome(TRANSPORT, request, error)  # a bug is raised for the supervisor
                self.metrics.count("transmit_ok" if outcome.ok else "transmit_failed")
                try:
                    self.tell(request.reply_to, outcome)
                except BusError as exc:
                    self.io_log.warning("send_outcome_undeliverable", to=request.reply_to, reason=str(exc))

        sending = self.host.send_many(first.address, first.peer_id, [r.envelope for r in requests])
        self.run_on_loop(sending, then, post_success=first.report_success)

    async def _status(self) -> Libp2pStatus:
        return Libp2pStatus(
            str(self.host.peer_id), self.host.address, tuple(sorted(self.host.peers)), dict(self.host.counts)
        )


def libp2p_status(client: Sender, name: str = "libp2p", *, timeout: float = 5.0) -> Libp2pStatus:
    """The libp2p actor's identity, peers and counters."""
    reply = client.ask(name, GetLibp2pStatus(), timeout=timeout)
    if not isinstance(reply, Libp2pStatus):
        raise BusError(f"libp2p actor {name!r} answered {reply!r}")
    return reply
