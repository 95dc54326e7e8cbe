"""The delivery retrier's whole protocol on the bus.

From the application::

    Deliver(envelope)          tell or ask [DeliverReply]: send one encoded envelope reliably
    DeliverMany(envelopes)     ask [DeliverManyReply]: several at once, stored in one commit
    Handled(message_id)        tell: the application finished handling an Incoming
                               (the node's app gateway commits that in the inbox itself instead)
    GetRetrierStatus()         ask [RetrierStatus]
    TransportDown(transport)   tell: that transport's actor died; its attempts in flight fail at once

To the application (the configured ``deliver_to`` / ``report_to``)::

    IncomingMany(message_ids, envelopes)         the new messages for this node of one turn (each until Handled)
    Incoming(message_id, envelope)               one, dispatched again (after a restart, or a refused hand-over),
                                                 and each message for ``transfer_to``
    MessagesDelivered(message_ids, attempts, transports)        the round's acked sends, one message
    MessageFailed(message_id, attempts, last_error, reason)     .exception() is DeliveryFailed

With transports it speaks the transport contract (:mod:`villagemesh.actors.core.transport`:
``Transmit`` out, ``TransmitResult`` and ``Received`` in) and with the registry
``PeerRoutes`` / ``ListRoutes`` (:mod:`villagemesh.actors.registry.messages`).

End-to-end acks are envelopes too: kind :data:`ACK_KIND`, ``correlation_id`` =
the (first) acknowledged message's id, priority CRITICAL; the payload carries the
ids of further messages acknowledged by the same envelope (16 bytes each, at
most :data:`ACK_IDS_MAX` in all): a receiver acks every message of one batch
turn from one peer with one envelope. They are sent best-effort (not through
the outbox): a lost ack makes the sender retry, and the retry is acked again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from villagemesh.actors.core import codec
from villagemesh.errors import DeliveryFailed

__all__ = [
    "ACK_IDS_MAX",
    "ACK_KIND",
    "ACK_TTL",
    "Deliver",
    "DeliverMany",
    "DeliverManyReply",
    "DeliverReply",
    "GetRetrierStatus",
    "Handled",
    "Incoming",
    "IncomingMany",
    "MessageFailed",
    "MessagesDelivered",
    "RetrierStarted",
    "RetrierStatus",
    "TransportDown",
]

ACK_KIND = "ACK"
"""The envelope kind of an end-to-end acknowledgement."""

ACK_TTL = 300.0
"""Seconds an ack envelope lives: long enough for any transport's queue, short enough to drop stale acks."""

ACK_IDS_MAX = 1024
"""Message ids one ack envelope carries at most (16 KiB of payload: well inside one secure frame's budget)."""


def ack_ids(correlation_id: bytes, payload: bytes) -> list[bytes]:
    """Every message id an ack envelope acknowledges: its ``correlation_id``, then each 16 bytes of its payload."""
    return [correlation_id, *(payload[i : i + 16] for i in range(0, len(payload) - len(payload) % 16, 16))]


@codec.message("retrier.Deliver")
@dataclass(frozen=True, slots=True)
class Deliver:
    """Send ``envelope`` (an encoded :class:`~villagemesh.protocols.envelope.Message` with a
    recipient) reliably. As an ask, the reply comes once it is stored (durable).

    ``stored``: the envelope's outbox row is already committed (the app gateway stores an
    outcome report with its inbox mark): the retrier only takes it into its state."""

    envelope: bytes
    stored: bool = False


@codec.message("retrier.DeliverMany")
@dataclass(frozen=True, slots=True)
class DeliverMany:
    """Send every envelope of ``envelopes`` reliably, stored in one commit. As an ask, the reply
    comes once all are stored.

    ``answer_token`` (told, not asked: the node's asyncio face): once all are stored, the
    :class:`DeliverManyReply` resolves that token of the retrier's ``bridge`` (a
    :class:`~villagemesh.actors.app.state.Bridge`, in-process), so a loop awaits the commit
    with no thread blocked on it."""

    envelopes: tuple[bytes, ...]
    answer_token: int = 0


@codec.message("retrier.DeliverManyReply")
@dataclass(frozen=True, slots=True)
class DeliverManyReply:
    """Per envelope, in order: its message id (None if undecodable), and the error refusing it (None: stored)."""

    message_ids: tuple[bytes | None, ...]
    errors: tuple[str | None, ...]


@codec.message("retrier.DeliverReply")
@dataclass(frozen=True, slots=True)
class DeliverReply:
    """The envelope was stored (``new`` False: that id was already pending), or ``error`` says why not."""

    message_id: bytes | None
    new: bool
    error: str | None


@codec.message("retrier.Handled")
@dataclass(frozen=True, slots=True)
class Handled:
    """The application has handled the Incoming with ``message_id``: it is never dispatched again."""

    message_id: bytes


@codec.message("retrier.Started")
@dataclass(frozen=True, slots=True)
class RetrierStarted:
    """Told to ``transfer_to`` when a retrier instance starts: the chunks a former instance held in memory
    are gone (the transfer actor offers again what was mid-window; the answer rewinds it)."""


@codec.message("retrier.Incoming")
@dataclass(frozen=True, slots=True)
class Incoming:
    """A message for this node, received and stored; answer with Handled when done."""

    message_id: bytes
    envelope: bytes


@codec.message("retrier.IncomingMany")
@dataclass(frozen=True, slots=True)
class IncomingMany:
    """The new messages for this node that one turn of the retrier received and stored, in arrival
    order, in one message (not one Incoming each); answer each with Handled when done.

    Parallel tuples; iterating gives each as an :class:`Incoming`.
    """

    message_ids: tuple[bytes, ...]
    envelopes: tuple[bytes, ...]

    def __iter__(self) -> Iterator[Incoming]:
        return (Incoming(m, e) for m, e in zip(self.message_ids, self.envelopes, strict=True))

    def __len__(self) -> int:
        return len(self.message_ids)


@codec.message("retrier.MessagesDelivered")
@dataclass(frozen=True, slots=True)
class MessagesDelivered:
    """The recipients acknowledged these messages: every delivery of one round of the retrier's
    decisions, in one message (not one per delivery: at full speed a round settles hundreds).

    The three tuples are parallel: ``message_ids[i]`` was delivered after ``attempts[i]`` attempts,
    the last on ``transports[i]``. Iterating gives ``(message_id, attempts, transport)`` triples.
    """

    message_ids: tuple[bytes, ...]
    attempts: tuple[int, ...]
    transports: tuple[str | None, ...]

    def __iter__(self) -> Iterator[tuple[bytes, int, str | None]]:
        return zip(self.message_ids, self.attempts, self.transports, strict=True)

    def __len__(self) -> int:
        return len(self.message_ids)


@codec.message("retrier.MessageFailed")
@dataclass(frozen=True, slots=True)
class MessageFailed:
    """The message was given up on (``reason``: ttl_expired, attempts_exhausted or no_route)."""

    message_id: bytes
    attempts: int
    last_error: str
    reason: str

    def exception(self) -> DeliveryFailed:
        """The error to raise for it."""
        return DeliveryFailed(self.message_id.hex(), self.attempts, self.last_error)


@codec.message("retrier.GetStatus")
@dataclass(frozen=True, slots=True)
class GetRetrierStatus:
    """Ask: counters and queue sizes."""


@codec.message("retrier.Status")
@dataclass(frozen=True, slots=True)
class RetrierStatus:
    """How the retrier is doing."""

    pending: int
    in_flight: int
    sent: int
    delivered: int
    failed: int
    retried: int
    received: int
    duplicates: int
    unhandled: int
    pending_by_priority: tuple[int, ...] = ()
    """Pending messages per priority, indexed by :class:`~villagemesh.protocols.envelope.Priority` value."""
    unreachable_peers: int = 0
    """Recipients whose last round failed wholly retryably: one probe at a time goes to each."""
    held: int = 0
    """Messages waiting for their unreachable recipient's probe to get through (no attempt spent)."""
    probes: int = 0
    """Messages picked to probe an unreachable recipient, since start."""
    chunks_held: int = 0
    """Transfer chunks handed to ``transfer_to`` and not yet Handled (acked once they are)."""


@codec.message("retrier.TransportDown")
@dataclass(frozen=True, slots=True)
class TransportDown:
    """The actor of ``transport`` died (crashed or stopped): what it had in flight gets no answer."""

    transport: str
