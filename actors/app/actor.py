"""The application gateway actor: the one place application code runs inside the node.

It speaks the retrier's application protocol
(:mod:`villagemesh.actors.retrier.messages`): for each ``Incoming`` (a new,
deduplicated message) it decodes the envelope, calls every subscriber of its
kind, then tells the retrier ``Handled`` so a restart does not dispatch it
again; ``MessageDelivered`` and ``MessageFailed`` resolve delivery handles.

A subscriber that raises is the application's fault, not the gateway's: the
exception is logged (``handler_failed``, with the traceback) and the other
subscribers still run; the message counts as handled. Letting it crash the
gateway would dispatch the same message again after the restart, forever.
"""

from __future__ import annotations

import asyncio
import traceback
from typing import Any

from villagemesh.actors.app.state import HandleTable, Subscribers
from villagemesh.actors.base import Actor, ActorContext
from villagemesh.actors.retrier.messages import Handled, Incoming, MessageDelivered, MessageFailed
from villagemesh.errors import ProtocolError
from villagemesh.protocols.envelope import decode_message

__all__ = ["AppActor"]


class AppActor(Actor):
    """Config: ``subscribers`` (Subscribers), ``handles`` (HandleTable), ``retrier`` (bus name)."""

    def __init__(self, ctx: ActorContext) -> None:
        super().__init__(ctx)
        self.subscribers: Subscribers = ctx.config["subscribers"]
        self.handles: HandleTable = ctx.config["handles"]
        self.retrier: str = ctx.config.get("retrier", "retrier")

    def handle(self, msg: Any) -> Any:
        if isinstance(msg, Incoming):
            self._dispatch_inbound(msg)
        elif isinstance(msg, MessageDelivered):
            self.handles.resolve(msg.message_id, True, msg.attempts, None)
        elif isinstance(msg, MessageFailed):
            self.handles.resolve(msg.message_id, False, msg.attempts, f"{msg.reason}: {msg.last_error}")
        else:
            raise TypeError(f"app gateway got an unexpected {type(msg).__name__}")
        return None

    def _dispatch_inbound(self, msg: Incoming) -> None:
        try:
            message = decode_message(msg.envelope)
        except ProtocolError as exc:
            self.ctx.log.emit("message_rejected", level="warning", actor=self.name, reason=str(exc))
            self.tell(self.retrier, Handled(msg.message_id))
            return
        for sub in self.subscribers.for_kind(message.kind):
            try:
                if sub.loop is not None:
                    asyncio.run_coroutine_threadsafe(sub.handler(message), sub.loop)
                else:
                    sub.handler(message)
            except Exception as exc:  # noqa: BLE001 - the application's bug: logged, the others still run
                self.ctx.log.emit(
                    "handler_failed",
                    level="error",
                    kind=message.kind,
                    handler=getattr(sub.handler, "__qualname__", repr(sub.handler)),
                    exc_type=type(exc).__name__,
                    exc_message=str(exc),
                    traceback="".join(traceback.format_exception(exc)),
                )
        self.tell(self.retrier, Handled(msg.message_id))
