"""The WebSocket actor's pure decisions: which side sends, and what an outcome tells the asker.

Nothing here touches a socket or the loop; :mod:`.actor` calls in with the
request and the error its send ended with (``None`` for success)::

    Transmit.address == REPLY_ADDRESS ─▶ SERVER  (on the peer's own open connection to us)
    any other address                 ─▶ CLIENT  (dial it, or reuse our connection to it)

    error                        TransmitResult                      SendEnvelope's answer
    None                         ok                                  EnvelopeSent
    ConnectError                 failed, retryable (surely not sent) SendFailed
    other VillageMeshError,      failed, not retryable (the peer     SendFailed
    CancelledError               may have the bytes)
    anything else                raised again: a bug, for the actor's supervisor to see
"""

from __future__ import annotations

import enum

from villagemesh.actors.core.transport import REPLY_ADDRESS, Transmit, TransmitResult, is_transport_failure
from villagemesh.actors.core.transport import transmit_outcome as outcome
from villagemesh.actors.websocket.messages import EnvelopeSent, SendEnvelope, SendFailed

__all__ = ["TRANSPORT", "Via", "send_outcome", "transmit_outcome", "via"]

TRANSPORT = "websocket"
"""This transport's name (and its actor's bus name in a node)."""


class Via(enum.Enum):
    """Which half of the actor carries a Transmit."""

    SERVER = "server"
    CLIENT = "client"


def via(request: Transmit) -> Via:
    """SERVER for :data:`REPLY_ADDRESS` (an ack back on the connection its message came in on), else CLIENT."""
    return Via.SERVER if request.address == REPLY_ADDRESS else Via.CLIENT


def transmit_outcome(request: Transmit, error: BaseException | None) -> TransmitResult:
    """The retrier's answer for a Transmit that ended with ``error``; ``error`` is raised again when it is a bug."""
    return outcome(TRANSPORT, request, error)


def send_outcome(request: SendEnvelope, message_id: bytes, error: BaseException | None) -> EnvelopeSent | SendFailed:
    """The answer to a direct SendEnvelope that ended with ``error``; ``error`` is raised again when it is a bug."""
    if error is None:
        return EnvelopeSent(request.url, message_id)
    if is_transport_failure(error):
        return SendFailed(request.url, message_id, type(error).__name__, str(error))
    raise error
