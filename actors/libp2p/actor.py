"""The libp2p actor: a real libp2p peer on the node's single port, speaking the transport contract.

Thin by design (the decisions live in :mod:`.state`, the connections in :mod:`.host`)::

    acceptor ──ConnectionHandedOff(fd, route libp2p)──▶ handle ──▶ adopt_handed_off ──▶ Connection (loop)
    Connection ──envelopes from node_id (loop)──bus (the loop's own sender; large ones: post)──▶ deliver_to: Received
    retrier ──Transmits──▶ handle_batch ──▶ loop: host.send_now, or run_on_loop(host.send_many) ──then──▶ reply_to
    sweeper ──Discover──▶ handle ──▶ Discovered

Transmits that ask for no report of success (the retrier's: the end-to-end ack says it)
go out from a plain loop callback when the peer's connection is up and has room
(``host.send_now``: no task, no future); otherwise, and whenever a success is to be
reported, as a task that dials if need be and waits for room (``host.send_many``).

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

import asyncio
import time
from typing import Any

from villagemesh.actors.core.base import Request
from villagemesh.actors.core.bus import Sender
from villagemesh.actors.core.loopactor import LOOP_CALL_TIMEOUT_S, EnvelopeTransportActor
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.core.transport import (
    ConnectionHandedOff,
    Discover,
    Discovered,
    Sighting,
    Transmit,
    TransmitMany,
    group_transmits,
    transmit_outcome,
)
from villagemesh.actors.libp2p.aead import BULK_AEAD
from villagemesh.actors.libp2p.host import Libp2pHost, Libp2pStream
from villagemesh.actors.libp2p.kad import PROVIDER_KEY, Kademlia, dialable
from villagemesh.actors.libp2p.messages import GetLibp2pStatus, Libp2pStatus
from villagemesh.actors.libp2p.state import ANNOUNCE_PROTOCOL, TRANSPORT, Libp2pLimits, node_id_of
from villagemesh.errors import BusError, ConfigError, RemoteProtocolError, VillageMeshError
from villagemesh.protocols.discovery import MAX_DISCOVERY_FRAME, Announce, decode_discovery, encode_discovery
from villagemesh.protocols.libp2p.kad import KadPeer
from villagemesh.protocols.libp2p.varint import frame

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

        self.identity: Any = config.get("identity")
        """What we announce (a :class:`~villagemesh.actors.lan.identity.Identity`: ``announce()`` signs afresh)."""
        bootstrap = tuple(config.get("bootstrap", ()))

        async def make() -> tuple[Libp2pHost, Kademlia]:
            host = Libp2pHost(keys, self.envelope_received, listen=config.get("listen"), limits=limits, log=self.io_log)
            kad = Kademlia(host)
            for address in bootstrap:
                kad.add(address)
            if self.identity is not None:
                host.handlers[ANNOUNCE_PROTOCOL] = self._announce
            return host, kad

        self.host, self.kad = self.io_loop.call(make(), LOOP_CALL_TIMEOUT_S)
        self.io_log.info(
            "libp2p_listening",
            address=self.host.address,
            peer_id=str(self.host.peer_id),
            bulk_cipher="libsodium" if BULK_AEAD is None else "openssl",  # the extra 'fast' installed or not
        )

    async def io_shutdown(self) -> None:
        """GoAway and close every connection."""
        kad = getattr(self, "kad", None)
        if kad is not None:
            kad.close()
        host = getattr(self, "host", None)
        if host is not None:
            await host.close()

    # -- bus messages -------------------------------------------------------------------------------

    def handle(self, msg: Any) -> Any:
        """:class:`ConnectionHandedOff`, :class:`Transmit`, :class:`Discover`, :class:`GetLibp2pStatus`."""
        if isinstance(msg, ConnectionHandedOff):
            self.adopt_handed_off(msg, self.host.protocol_factory)
            return None
        if isinstance(msg, Transmit | TransmitMany):
            self._start_grouped([msg])
            return None
        if isinstance(msg, Discover):
            self._start_discovery(msg)
            return None
        if isinstance(msg, GetLibp2pStatus):
            return self.io_loop.call(self._status(), LOOP_CALL_TIMEOUT_S)
        return super().handle(msg)

    def handle_batch(self, batch: list[Request]) -> None:
        """Every message waiting: the Transmits to one peer go out in one write, the rest one by one."""
        sends: list[Transmit | TransmitMany] = []
        for request in batch:
            if isinstance(request.msg, Transmit | TransmitMany):
                sends.append(request.msg)
            else:
                answer = self.handle(request.msg)
                if request.token is not None:
                    request.token.reply(answer)
        if sends:
            self._start_grouped(sends)

    def _start_grouped(self, sends: list[Transmit | TransmitMany]) -> None:
        """Start ``sends`` in order, one write per peer address."""
        for transmits in group_transmits(sends).values():
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

        raws = [r.envelope for r in requests]
        if first.report_success:
            self.run_on_loop(self.host.send_many(first.address, first.peer_id, raws), then)
            return

        def now() -> None:  # on the loop: at once when the connection is up and has room, else as a task
            try:
                if self.host.send_now(first.address, first.peer_id, raws):
                    return
            except VillageMeshError:
                pass  # the task meets it too, and reports it as the transmits' outcome
            self.run_on_loop(self.host.send_many(first.address, first.peer_id, raws), then, post_success=False)

        self.io_loop.call_soon(now)

    # -- discovery: Kademlia, then each villagemesh provider's signed announce ---------------------

    async def _announce(self, stream: Libp2pStream) -> None:
        """Serve ``/villagemesh/announce/1.0.0``: our freshly signed announce, then the end of stream."""
        await stream.write(frame(encode_discovery(self.identity.announce())))

    def _start_discovery(self, msg: Discover) -> None:
        def then(found: tuple[tuple[Sighting, ...], tuple[str, ...]] | None, error: BaseException | None) -> None:
            if error is not None and not isinstance(error, TimeoutError | VillageMeshError | asyncio.CancelledError):
                raise error  # a bug: for the supervisor
            sightings, errors = found if found is not None else ((), (f"{type(error).__name__}: {error}",))
            try:
                self.tell(msg.reply_to, Discovered(msg.round, TRANSPORT, sightings, errors))
            except BusError as exc:
                self.io_log.warning("send_outcome_undeliverable", to=msg.reply_to, reason=str(exc))

        self.run_on_loop(self._discover(msg.timeout), then)

    async def _discover(self, timeout: float) -> tuple[tuple[Sighting, ...], tuple[str, ...]]:
        """Provide :data:`~.kad.PROVIDER_KEY`, find its providers, and read each one's signed announce."""
        errors: list[str] = []
        if len(self.kad.table) == 0 and not self.kad.providers.get(PROVIDER_KEY, time.time()):
            return (), ()  # nobody to ask (no bootstrap peer, none found yet) and no node provided to us
        async with asyncio.timeout(timeout * 0.9):  # the answer must reach the sweeper within its round
            if self.identity is not None:
                await self.kad.provide(PROVIDER_KEY)
            providers = await self.kad.find_providers(PROVIDER_KEY)
            found = await asyncio.gather(*(self._sighting(p) for p in providers), return_exceptions=True)
        sightings = []
        for peer, result in zip(providers, found, strict=True):
            if isinstance(result, Sighting):
                sightings.append(result)
            elif isinstance(result, VillageMeshError | TimeoutError):
                errors.append(f"{peer.peer_id}: {type(result).__name__}: {result}")
            elif isinstance(result, BaseException):
                raise result
        return tuple(sightings), tuple(errors)

    async def _sighting(self, peer: KadPeer) -> Sighting:
        """``peer``'s signed announce, checked to be the node its libp2p key names."""
        node_id = node_id_of(peer.peer_id)  # a provider without an Ed25519 key is no villagemesh node
        address = dialable(peer)  # its first TCP address (peers list them with and without /p2p/)
        started = time.perf_counter()
        stream = await self.host.open_stream(address, ANNOUNCE_PROTOCOL, node_id)
        body = await stream.read_frame(MAX_DISCOVERY_FRAME)
        latency_ms = (time.perf_counter() - started) * 1000.0
        stream.close()
        event = decode_discovery(body)  # signed types are verified as they are decoded
        if not isinstance(event, Announce) or event.node_id != node_id:
            raise RemoteProtocolError(f"libp2p {peer.peer_id}: its announce is not a signed announce of node {node_id}")
        return Sighting(TRANSPORT, body.decode(), latency_ms)

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
