"""The LAN discovery actor: beacons, the TCP discovery responder, and probes, on one loop thread.

Thin by design (the logic lives in :mod:`.state`, :mod:`.beacon`, :mod:`.tcp`)::

    UDP beacon (loop) ──on_peer──▶ post ──▶ on_loop_message ──bus──▶ peers_to: PeerAnnounced
    acceptor ──ConnectionHandedOff(fd, route=discovery)──▶ adopt_handed_off ──▶ DiscoveryResponder
    anyone ──ProbePeer──▶ run_on_loop(probe) ──then──▶ reply_to: PeerProbed | ProbeFailed

It is also a discovery source for the sweeper (the transport contract's
``Discover``): each round probes every ``bootstrap`` address concurrently on
the loop, each probe bounded by the round's timeout, and answers one
``Discovered`` with a ``Sighting`` per verified response and an error string
per address that failed. A failing address never holds up the others.

Config (``ctx.config``): ``identity`` (:class:`~.identity.Identity`, required),
``beacon`` (:class:`~.beacon.BeaconConfig`), ``beacons`` (False: no UDP
beacons at all, default True), ``bootstrap`` (``host:port`` acceptor addresses
to probe each round), ``peers_to`` (actor name for verified announces;
without it they are counted only).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from villagemesh.actors.acceptor.loopactor import LOOP_CALL_TIMEOUT_S, LoopActor
from villagemesh.actors.acceptor.messages import ConnectionHandedOff
from villagemesh.actors.bus import Sender
from villagemesh.actors.lan.beacon import BeaconConfig, BeaconEndpoint
from villagemesh.actors.lan.identity import Identity
from villagemesh.actors.lan.messages import GetLanStatus, LanStatus, PeerAnnounced, PeerProbed, ProbeFailed, ProbePeer
from villagemesh.actors.lan.tcp import DiscoveryResponder, probe
from villagemesh.actors.transport import Discover, Discovered, Sighting
from villagemesh.errors import BusError, ConfigError, VillageMeshError
from villagemesh.protocols.discovery import Announce, DiscoveryRequest, DiscoveryResponse, encode_discovery

__all__ = ["TRANSPORT", "LanActor", "lan_status", "probe_peer"]

TRANSPORT = "lan"
"""The name this discovery source reports its sightings under."""


def _host_port(entry: str) -> tuple[str, int]:
    host, sep, port = str(entry).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"bootstrap entries are 'host:port', got {entry!r}")
    return host, int(port)


class LanActor(LoopActor):
    """Finds peers on the local network and answers those who ask."""

    def on_start(self) -> None:
        config = self.ctx.config
        identity = config.get("identity")
        if not isinstance(identity, Identity):
            raise ConfigError(f"the LAN actor needs config['identity'] (an Identity), got {identity!r}")
        self.identity = identity
        self.peers_to: str | None = config.get("peers_to")
        self.responder_counts: Counter[str] = Counter()
        self.bootstrap = tuple(_host_port(entry) for entry in config.get("bootstrap", ()))
        self.beacon: BeaconEndpoint | None = None
        self.start_io()
        if config.get("beacons", True):
            self.beacon = BeaconEndpoint(identity, self._heard, config.get("beacon") or BeaconConfig(), log=self.io_log)
            self.io_loop.call(self.beacon.start(), LOOP_CALL_TIMEOUT_S)

    async def io_shutdown(self) -> None:
        """Stop beaconing and close the UDP socket."""
        beacon = getattr(self, "beacon", None)
        if beacon is not None:
            await beacon.close()

    def _heard(self, announce: Announce, source: tuple[str, int]) -> None:
        # On the loop thread: only pass the value on.
        self.post((announce, source))

    def on_loop_message(self, message: Any) -> None:
        """A verified announce heard by the beacon: tell ``peers_to``."""
        announce, (host, port) = message
        if self.peers_to is not None:
            heard = PeerAnnounced(announce.node_id, announce.addresses, f"{host}:{port}", encode_discovery(announce))
            self._tell(self.peers_to, heard)

    # -- bus messages -------------------------------------------------------------------------------

    def handle(self, msg: Any) -> Any:
        """:class:`ConnectionHandedOff` (discovery), :class:`ProbePeer`, :class:`GetLanStatus`."""
        if isinstance(msg, ConnectionHandedOff):
            self.adopt_handed_off(
                msg, lambda: DiscoveryResponder(self.identity, counts=self.responder_counts, log=self.io_log)
            )
            return None
        if isinstance(msg, ProbePeer):
            self._start_probe(msg)
            return None
        if isinstance(msg, Discover):
            self._start_round(msg)
            return None
        if isinstance(msg, GetLanStatus):
            return self.io_loop.call(self._statistics(), LOOP_CALL_TIMEOUT_S)
        return super().handle(msg)

    def _start_round(self, request: Discover) -> None:
        asking = self._request()
        # Each probe gets most of the round's time, so its answer (or error) beats the deadline.
        per_probe = max(0.05, request.timeout * 0.8)

        async def one(host: str, port: int) -> Sighting | str:
            try:
                response, latency_ms = await probe(host, port, per_probe, request=asking)
            except VillageMeshError as exc:
                return f"{host}:{port}: {type(exc).__name__}: {exc}"
            return Sighting(TRANSPORT, encode_discovery(response).decode(), latency_ms)

        async def everyone() -> list[Sighting | str]:
            return list(await asyncio.gather(*(one(h, p) for h, p in self.bootstrap)))

        def then(results: list[Sighting | str] | None, error: BaseException | None) -> None:
            if error is not None:
                raise error  # probes report their own failures: anything else is a bug
            found = tuple(r for r in results or () if isinstance(r, Sighting))
            errors = tuple(r for r in results or () if isinstance(r, str))
            self._tell(request.reply_to, Discovered(request.round, TRANSPORT, found, errors))

        self.run_on_loop(everyone(), then)

    def _request(self) -> DiscoveryRequest:
        return DiscoveryRequest(
            node_id=self.identity.node_id,
            addresses=self.identity.addresses,
            capabilities=self.identity.capabilities,
            timestamp=self.identity.clock(),
        )

    def _start_probe(self, request: ProbePeer) -> None:
        asking = self._request()

        def then(result: tuple[DiscoveryResponse, float] | None, error: BaseException | None) -> None:
            outcome: object
            if result is not None:
                response, latency_ms = result
                outcome = PeerProbed(
                    request.host,
                    request.port,
                    response.node_id,
                    response.addresses,
                    latency_ms,
                    encode_discovery(response),
                )
            elif isinstance(error, VillageMeshError | asyncio.CancelledError):
                outcome = ProbeFailed(request.host, request.port, type(error).__name__, str(error))
            else:
                assert error is not None
                raise error  # not a network failure: a bug, let the supervisor see it
            self._tell(request.reply_to, outcome)

        self.run_on_loop(probe(request.host, request.port, request.timeout, request=asking), then)

    def _tell(self, to: str, msg: object) -> None:
        try:
            self.tell(to, msg)
        except BusError as exc:
            self.io_log.warning("lan_outcome_undeliverable", to=to, reason=str(exc))

    async def _statistics(self) -> LanStatus:
        if self.beacon is None:
            return LanStatus("off", {}, dict(self.responder_counts))
        return LanStatus(self.beacon.mode, dict(self.beacon.counts), dict(self.responder_counts))


def probe_peer(client: Sender, host: str, port: int, *, reply_to: str, name: str = "lan", timeout: float = 5.0) -> None:
    """Ask the LAN actor to probe ``host:port``; a PeerProbed or ProbeFailed is told to ``reply_to``."""
    client.tell(name, ProbePeer(host, port, timeout, reply_to))


def lan_status(client: Sender, name: str = "lan", *, timeout: float = 5.0) -> LanStatus:
    """The LAN actor's beacon mode and counters."""
    reply = client.ask(name, GetLanStatus(), timeout=timeout)
    if not isinstance(reply, LanStatus):
        raise BusError(f"LAN actor {name!r} answered {reply!r}")
    return reply
