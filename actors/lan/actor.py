"""The LAN discovery actor: beacons, the TCP discovery responder, and probes, on one loop thread.

Thin by design (the logic lives in :mod:`.state`, :mod:`.beacon`, :mod:`.tcp`)::

    UDP beacon (loop) ──on_peer──▶ actor_ref.tell ──▶ handle ──bus──▶ peers_to: PeerAnnounced
    acceptor ──ConnectionHandedOff(fd, route=discovery)──▶ loop: DiscoveryResponder answers
    anyone ──ProbePeer──▶ loop: probe() ──done──▶ actor_ref.tell ──▶ reply_to: PeerProbed | ProbeFailed

Config (``ctx.config``): ``identity`` (:class:`~.identity.Identity`, required),
``beacon`` (:class:`~.beacon.BeaconConfig`), ``peers_to`` (actor name for
verified announces; without it they are counted only).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pykka

from villagemesh.actors.acceptor.loopthread import EventLogLogger, LoopThread
from villagemesh.actors.acceptor.messages import ConnectionHandedOff
from villagemesh.actors.acceptor.server import HandedOff, adopt
from villagemesh.actors.acceptor.state import Route
from villagemesh.actors.base import Actor
from villagemesh.actors.bus import Sender
from villagemesh.actors.lan.beacon import BeaconConfig, BeaconEndpoint
from villagemesh.actors.lan.identity import Identity
from villagemesh.actors.lan.messages import GetLanStatus, LanStatus, PeerAnnounced, PeerProbed, ProbeFailed, ProbePeer
from villagemesh.actors.lan.tcp import DiscoveryResponder, probe
from villagemesh.errors import BusError, ConfigError, VillageMeshError
from villagemesh.protocols.discovery import Announce, DiscoveryRequest, DiscoveryResponse, encode_discovery

__all__ = ["LanActor", "lan_status", "probe_peer"]

LOOP_CALL_TIMEOUT_S = 5.0
"""Starting, stopping or reading counters on the loop takes milliseconds."""


@dataclass(frozen=True, slots=True)
class _Heard:
    announce: Announce
    source: tuple[str, int]


@dataclass(frozen=True, slots=True)
class _Probed:
    request: ProbePeer
    result: tuple[DiscoveryResponse, float] | None
    error: BaseException | None


class LanActor(Actor):
    """Finds peers on the local network and answers those who ask."""

    def on_start(self) -> None:
        config = self.ctx.config
        identity = config.get("identity")
        if not isinstance(identity, Identity):
            raise ConfigError(f"the LAN actor needs config['identity'] (an Identity), got {identity!r}")
        self.identity = identity
        self.peers_to: str | None = config.get("peers_to")
        self.io_log = EventLogLogger(self.ctx.log, actor=self.name)
        self.responder_counts: Counter[str] = Counter()
        self.beacon = BeaconEndpoint(identity, self._heard, config.get("beacon") or BeaconConfig(), log=self.io_log)
        self.io_loop = LoopThread(f"{self.name}-loop")
        self.io_loop.start(lambda target, name: self.spawn_thread(target, name=name))
        self.io_loop.call(self.beacon.start(), LOOP_CALL_TIMEOUT_S)

    def on_stop(self) -> None:
        if not self.io_loop.loop.is_closed():
            self.io_loop.call(self.beacon.close(), LOOP_CALL_TIMEOUT_S)
        self.io_loop.stop()

    # -- loop thread → actor thread -------------------------------------------------------------

    def _heard(self, announce: Announce, source: tuple[str, int]) -> None:
        self._to_actor(_Heard(announce, source))

    def _to_actor(self, msg: object) -> None:
        try:
            self.actor_ref.tell(msg)
        except pykka.ActorDeadError:
            return  # the instance is ending; its successor starts clean

    def on_receive(self, message: Any) -> Any:
        """Internal messages from the loop thread."""
        if isinstance(message, _Heard):
            if self.peers_to is not None:
                a, (host, port) = message.announce, message.source
                self._tell(self.peers_to, PeerAnnounced(a.node_id, a.addresses, f"{host}:{port}", encode_discovery(a)))
            return None
        if isinstance(message, _Probed):
            self._probed(message)
            return None
        return super().on_receive(message)

    # -- bus messages -------------------------------------------------------------------------------

    def handle(self, msg: Any) -> Any:
        """:class:`ConnectionHandedOff` (discovery), :class:`ProbePeer`, :class:`GetLanStatus`."""
        if isinstance(msg, ConnectionHandedOff):
            handed = HandedOff(socket.socket(fileno=msg.fd), msg.peeked, msg.peer, Route(msg.route))
            factory = lambda: DiscoveryResponder(self.identity, counts=self.responder_counts, log=self.io_log)  # noqa: E731
            asyncio.run_coroutine_threadsafe(adopt(handed, factory), self.io_loop.loop)
            return None
        if isinstance(msg, ProbePeer):
            self._start_probe(msg)
            return None
        if isinstance(msg, GetLanStatus):
            return self.io_loop.call(self._statistics(), LOOP_CALL_TIMEOUT_S)
        return super().handle(msg)

    def _start_probe(self, request: ProbePeer) -> None:
        asking = DiscoveryRequest(
            node_id=self.identity.node_id,
            addresses=self.identity.addresses,
            capabilities=self.identity.capabilities,
            timestamp=self.identity.clock(),
        )
        future = asyncio.run_coroutine_threadsafe(
            probe(request.host, request.port, request.timeout, request=asking), self.io_loop.loop
        )

        def done(f: concurrent.futures.Future[tuple[DiscoveryResponse, float]]) -> None:
            if f.cancelled():
                self._to_actor(_Probed(request, None, asyncio.CancelledError("probe cancelled")))
            elif f.exception() is not None:
                self._to_actor(_Probed(request, None, f.exception()))
            else:
                self._to_actor(_Probed(request, f.result(), None))

        future.add_done_callback(done)

    def _probed(self, done: _Probed) -> None:
        request = done.request
        if done.result is not None:
            response, latency_ms = done.result
            outcome: object = PeerProbed(
                request.host,
                request.port,
                response.node_id,
                response.addresses,
                latency_ms,
                encode_discovery(response),
            )
        elif isinstance(done.error, VillageMeshError | asyncio.CancelledError):
            outcome = ProbeFailed(request.host, request.port, type(done.error).__name__, str(done.error))
        else:
            assert done.error is not None
            raise done.error  # not a network failure: a bug, let the supervisor see it
        self._tell(request.reply_to, outcome)

    def _tell(self, to: str, msg: object) -> None:
        try:
            self.tell(to, msg)
        except BusError as exc:
            self.io_log.warning("lan_outcome_undeliverable", to=to, reason=str(exc))

    async def _statistics(self) -> LanStatus:
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
