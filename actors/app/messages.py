"""The application gateway's messages: what the retrier tells it, and what it answers."""

from __future__ import annotations

from dataclasses import dataclass

from villagemesh.actors import codec

__all__ = ["DeliveryUpdate", "Handled", "Inbound"]


@codec.message("app.Inbound")
@dataclass(frozen=True, slots=True)
class Inbound:
    """From the retrier: a new (deduplicated) message for the application."""

    message_id: bytes
    envelope: bytes


@codec.message("app.Handled")
@dataclass(frozen=True, slots=True)
class Handled:
    """To the retrier: every subscriber has had the message; it will not be dispatched again."""

    message_id: bytes


@codec.message("app.DeliveryUpdate")
@dataclass(frozen=True, slots=True)
class DeliveryUpdate:
    """From the retrier: an outbound message reached its end (delivered, or given up on)."""

    message_id: bytes
    delivered: bool
    attempts: int
    last_error: str | None
