"""The acceptor actor: owns the sniffing listener's loop thread and forwards hand-offs on the bus.

Thin by design (the logic lives in :mod:`.state` and :mod:`.server`)::

    acceptor loop thread                       acceptor actor thread               owner actor
    AcceptorServer ──HandedOff──▶ post ──▶ on_loop_message: detach fd ──bus──▶ ConnectionHandedOff

The hand-off crosses into the actor's thread first because bus sockets may
only be used by the thread that made them. If the owner cannot be told (no
such actor, mailbox full), the descriptor is closed and the connection logged
as rejected. Descriptors are process-local: route owners must run in this
process (thread isolation), not as process children. The connection's slot
in the node's limiter is held under its descriptor while the message travels
(:func:`~villagemesh.actors.core.handoff.hold`); the owner claims it.

Config (``ctx.config``): ``host`` (default 127.0.0.1), ``port`` (0 = any),
``limits`` (:class:`~.state.AcceptorLimits`), ``routes``: route name →
owning actor name, e.g. ``{"http": "websocket", "discovery": "lan"}``;
``connections``: the node's :class:`~villagemesh.actors.core.handoff.ConnectionLimiter`
(kept across restarts of the acceptor; one of its own from ``limits`` without it).
"""

from __future__ import annotations

import os
from typing import Any

from villagemesh.actors.acceptor.messages import AcceptorStatus, GetAcceptorStatus
from villagemesh.actors.acceptor.server import AcceptorServer
from villagemesh.actors.acceptor.state import AcceptorLimits
from villagemesh.actors.core.bus import Sender
from villagemesh.actors.core.handoff import ConnectionLimiter, HandedOff, Route, claim, hold
from villagemesh.actors.core.loopactor import LOOP_CALL_TIMEOUT_S, LoopActor
from villagemesh.actors.core.transport import ConnectionHandedOff
from villagemesh.errors import BusError, ConfigError

__all__ = ["AcceptorActor", "acceptor_status"]


class AcceptorActor(LoopActor):
    """One TCP port for every protocol; hands each sniffed connection to its route's owner."""

    def on_start(self) -> None:
        config = self.ctx.config
        self.routes = {Route(k): v for k, v in dict(config.get("routes", {})).items()}
        limits = config.get("limits") or AcceptorLimits()
        if not isinstance(limits, AcceptorLimits):
            raise ConfigError(f"acceptor limits must be AcceptorLimits, got {limits!r}")
        limiter = config.get("connections")
        if limiter is not None and not isinstance(limiter, ConnectionLimiter):
            raise ConfigError(f"acceptor connections must be a ConnectionLimiter, got {limiter!r}")
        self.start_io()
        self.server = AcceptorServer(limits, log=self.io_log, limiter=limiter)
        for route in self.routes:
            self.server.route_hand_off(route, self._handed_off)
        host, port = str(config.get("host", "127.0.0.1")), int(config.get("port", 0))
        self.address = self.io_loop.call(self.server.start(host, port), LOOP_CALL_TIMEOUT_S)
        self.io_log.info("acceptor_listening", host=self.address[0], port=self.address[1])

    async def io_shutdown(self) -> None:
        """Stop listening (routed connections belong to their handlers)."""
        server = getattr(self, "server", None)
        if server is not None:
            await server.close()

    def _handed_off(self, handed: HandedOff) -> None:
        # On the loop thread: only pass the value on. If the actor is gone, the
        # connection goes with it (and its slot is given back).
        if not self.post(handed):
            handed.sock.close()
            if handed.release is not None:
                handed.release()

    def on_loop_message(self, message: Any) -> None:
        """A :class:`HandedOff` from the loop: tell its route's owner, descriptor and all."""
        assert isinstance(message, HandedOff)
        owner = self.routes[message.route]
        fd = message.sock.detach()
        hold(fd, message.release)
        try:
            self.tell(owner, ConnectionHandedOff(message.route.value, fd, message.peeked, message.peer))
        except BusError as exc:
            release = claim(fd)
            os.close(fd)
            if release is not None:
                release()
            self.io_log.warning(
                "connection_rejected",
                peer=message.peer,
                reason=f"route owner {owner!r} unreachable: {exc}",
                protocol=message.route.value,
                peeked_bytes=len(message.peeked),
            )

    async def _statistics(self) -> dict[str, int]:
        return self.server.statistics()

    def handle(self, msg: Any) -> Any:
        """Bus messages: :class:`GetAcceptorStatus`."""
        if isinstance(msg, GetAcceptorStatus):
            stats = self.io_loop.call(self._statistics(), LOOP_CALL_TIMEOUT_S)  # counters live on the loop
            counts = {k: v for k, v in stats.items() if k != "open"}
            return AcceptorStatus(self.address[0], self.address[1], stats["open"], counts)
        return super().handle(msg)


def acceptor_status(client: Sender, name: str = "acceptor", *, timeout: float = 5.0) -> AcceptorStatus:
    """Ask the acceptor named ``name`` where it listens and what it has counted."""
    reply = client.ask(name, GetAcceptorStatus(), timeout=timeout)
    if not isinstance(reply, AcceptorStatus):
        raise BusError(f"acceptor {name!r} answered {reply!r}")
    return reply
