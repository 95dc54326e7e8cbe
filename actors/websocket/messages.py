"""The WebSocket actor's whole protocol on the bus.

Envelopes travel as their encoded bytes (:func:`~villagemesh.protocols.envelope.encode_message`):
the bus codec carries bytes, and the receiver decodes (and so validates) once.
"""

from __future__ import annotations

from dataclasses import dataclass

from villagemesh.actors.core import codec

__all__ = [
    "EnvelopeSent",
    "GetWebSocketStatus",
    "SendEnvelope",
    "SendFailed",
    "WebSocketStatus",
]


@codec.message("websocket.SendEnvelope")
@dataclass(frozen=True, slots=True)
class SendEnvelope:
    """Tell: send ``envelope`` to the peer at ``url`` (``ws://host:port``); the outcome goes to ``reply_to``."""

    url: str
    envelope: bytes
    reply_to: str | None = None


@codec.message("websocket.EnvelopeSent")
@dataclass(frozen=True, slots=True)
class EnvelopeSent:
    """The envelope with ``message_id`` was written to the peer's WebSocket."""

    url: str
    message_id: bytes


@codec.message("websocket.SendFailed")
@dataclass(frozen=True, slots=True)
class SendFailed:
    """The envelope was not sent: ``error`` is the exception class (ConnectError, TransportTimeout, ...)."""

    url: str
    message_id: bytes
    error: str
    reason: str


@codec.message("websocket.GetStatus")
@dataclass(frozen=True, slots=True)
class GetWebSocketStatus:
    """Ask: what has the transport counted?"""


@codec.message("websocket.Status")
@dataclass(frozen=True, slots=True)
class WebSocketStatus:
    """Server and client counters."""

    server: dict[str, int]
    client: dict[str, int]
