"""The acceptor actor: owns the sniffing listener's loop thread and forwards hand-offs on the bus.

Thin by design (the logic lives in :mod:`.state` and :mod:`.server`)::

    acceptor loop thread                       acceptor actor thread               owner actor
    AcceptorServer ──HandedOff──▶ actor_ref.tell ──▶ handle: detach fd ──bus──▶ ConnectionHandedOff

The hand-off crosses into the actor's thread first because bus sockets may
only be used by the thread that made them. If the owner cannot be told (no
such actor, mailbox full), the descriptor is closed and the connection logged
as rejected.

Config (``ctx.config``): ``host`` (default 127.0.0.1), ``port`` (0 = any),
``limits`` (:class:`~.state.AcceptorLimits`), ``routes``: route name →
owning actor name, e.g. ``{"http": "websocket", "discovery": "lan"}``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pykka

from villagemesh.actors.acceptor.loopthread import EventLogLogger, LoopThread
from villagemesh.actors.acceptor.messages import AcceptorStatus, ConnectionHandedOff, GetAcceptorStatus
from villagemesh.actors.acceptor.server import AcceptorServer, HandedOff
from villagemesh.actors.acceptor.state import AcceptorLimits, Route
from villagemesh.actors.base import Actor
from villagemesh.actors.bus import Sender
from villagemesh.errors import BusError, ConfigError

__all__ = ["AcceptorActor", "acceptor_status"]

START_TIMEOUT_S = 5.0
"""Binding a port and starting a loop takes milliseconds; 5 s means something is wrong."""


@dataclass(frozen=True, slots=True)
class _Handed:
    """Loop thread → actor thread (pykka's queue, never the bus)."""

    handed: HandedOff


class AcceptorActor(Actor):
    """One TCP port for every protocol; hands each sniffed connection to its route's owner."""

    def on_start(self) -> None:
        config = self.ctx.config
        self.routes = {Route(k): v for k, v in dict(config.get("routes", {})).items()}
        limits = config.get("limits") or AcceptorLimits()
        if not isinstance(limits, AcceptorLimits):
            raise ConfigError(f"acceptor limits must be AcceptorLimits, got {limits!r}")
        self.io_log = EventLogLogger(self.ctx.log, actor=self.name)
        self.server = AcceptorServer(limits, log=self.io_log)
        for route in self.routes:
            self.server.route_hand_off(route, self._from_loop)
        self.io_loop = LoopThread(f"{self.name}-loop")
        self.io_loop.start(lambda target, name: self.spawn_thread(target, name=name))
        self.address = self.io_loop.call(
            self.server.start(str(config.get("host", "127.0.0.1")), int(config.get("port", 0))), START_TIMEOUT_S
        )
        self.io_log.info("acceptor_listening", host=self.address[0], port=self.address[1])

    def on_stop(self) -> None:
        if not self.io_loop.loop.is_closed():
            self.io_loop.call(self.server.close(), START_TIMEOUT_S)
        self.io_loop.stop()

    def _from_loop(self, handed: HandedOff) -> None:
        # Runs on the loop thread: only hand the value to the actor thread.
        try:
            self.actor_ref.tell(_Handed(handed))
        except pykka.ActorDeadError:
            handed.sock.close()

    def on_receive(self, message: Any) -> Any:
        """Internal messages from the loop thread."""
        if isinstance(message, _Handed):
            self._forward(message.handed)
            return None
        return super().on_receive(message)

    def _forward(self, handed: HandedOff) -> None:
        owner = self.routes[handed.route]
        fd = handed.sock.detach()
        try:
            self.tell(owner, ConnectionHandedOff(handed.route.value, fd, handed.peeked, handed.peer))
        except BusError as exc:
            os.close(fd)
            self.io_log.warning(
                "connection_rejected",
                peer=handed.peer,
                reason=f"route owner {owner!r} unreachable: {exc}",
                protocol=handed.route.value,
                peeked_bytes=len(handed.peeked),
            )

    async def _statistics(self) -> dict[str, int]:
        return self.server.statistics()

    def handle(self, msg: Any) -> Any:
        """Bus messages: :class:`GetAcceptorStatus`."""
        if isinstance(msg, GetAcceptorStatus):
            stats = self.io_loop.call(self._statistics(), START_TIMEOUT_S)  # counters live on the loop thread
            counts = {k: v for k, v in stats.items() if k != "open"}
            return AcceptorStatus(self.address[0], self.address[1], stats["open"], counts)
        return super().handle(msg)


def acceptor_status(client: Sender, name: str = "acceptor", *, timeout: float = 5.0) -> AcceptorStatus:
    """Ask the acceptor named ``name`` where it listens and what it has counted."""
    reply = client.ask(name, GetAcceptorStatus(), timeout=timeout)
    if not isinstance(reply, AcceptorStatus):
        raise BusError(f"acceptor {name!r} answered {reply!r}")
    return reply
