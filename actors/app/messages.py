"""The app gateway's protocol: outcome reports on the wire, and its bus messages.

An *outcome report* tells a sender what became of its message at the
recipient, after the handlers ran. It is an envelope of the reserved kind
:data:`OUTCOME_KIND`, sent back through the recipient's retrier like any
reliable message (stored, retried, acked), with ``correlation_id`` = the
reported message's id and a msgpack map as its payload::

    {"s": status, "r": reason | None, "t": exc_type | None, "v": reply | None}

``status`` is one of :class:`OutcomeStatus`: ``handled`` (every handler
returned; ``v`` is the first non-None return value, encoded by the
recipient's codec), ``unhandled`` (no handler for the kind: nothing ran) or
``handler_failed`` (a handler raised: ``t`` is the exception's type name,
``r`` its message; never a traceback). No outcome is ever sent for an
outcome report (or for an ack).

Plain successes travel together: the messages of one sender that one commit
settled as ``handled`` with nothing to say (no reply) go back in *batch reports*
of the kind :data:`OUTCOMES_KIND`, up to :data:`OUTCOMES_PER_REPORT` ids each
(so a report fits every transport's envelope, BetaNet's included), with no
``correlation_id`` and the payload ``{"h": [message id, ...]}``
(:class:`HandledBatch`). One reliable report per batch, not one per message:
the report traffic was half of all messages.

On the bus it speaks the retrier's application protocol, defined by its owner in
:mod:`villagemesh.actors.retrier.messages`: it receives ``IncomingMany`` and ``Incoming``
(new, deduplicated messages to dispatch), ``MessagesDelivered`` and ``MessageFailed``
(the end of one of this node's sends), and tells the retrier ``Deliver`` (an
outcome report). Its own bus message::

    BridgeQuery(token, query, argument)   tell: answer ``query`` for an asyncio caller (see villagemesh.aio)

Two messages of its own never cross the bus: :class:`CoroutineDone` is put
straight into the gateway instance's pykka inbox from the event loop a coroutine
handler ran on (it holds a ``Future``, which no codec could carry), so the mark
"handled" is committed in the gateway's thread; :class:`OutcomeDue` is its own
timer (sweep the sends whose outcome report is overdue).
"""

from __future__ import annotations

import enum
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import msgpack

from villagemesh.actors.core import codec
from villagemesh.errors import RemoteProtocolError

__all__ = [
    "MAX_REASON_CHARS",
    "OUTCOMES_KIND",
    "OUTCOMES_PER_REPORT",
    "OUTCOME_KIND",
    "REPORT_KINDS",
    "BridgeQuery",
    "CoroutineDone",
    "HandledBatch",
    "Outcome",
    "OutcomeDue",
    "OutcomeStatus",
]

OUTCOME_KIND = "villagemesh.outcome"
OUTCOMES_KIND = "villagemesh.outcomes"
"""The kind of a batch report: many messages handled, nothing more to say of any."""
OUTCOMES_PER_REPORT = 32
"""Message ids one batch report carries at most (about 560 bytes of payload)."""
REPORT_KINDS = frozenset({OUTCOME_KIND, OUTCOMES_KIND})
"""Kinds no handler ever sees: the gateway reads them itself."""
"""The reserved envelope kind of outcome reports (no application may subscribe to it)."""

MAX_REASON_CHARS = 1000
"""An exception's message is cut to this many characters: a report is a status, not a dump."""


class OutcomeStatus(enum.Enum):
    """What the recipient's handlers made of a message."""

    HANDLED = "handled"
    UNHANDLED = "unhandled"
    HANDLER_FAILED = "handler_failed"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One outcome report's content (the reported message's id travels as ``correlation_id``)."""

    status: OutcomeStatus
    reason: str | None = None
    exc_type: str | None = None
    reply: bytes | None = None

    def encode(self) -> bytes:
        """The report's payload bytes."""
        return msgpack.packb({"s": self.status.value, "r": self.reason, "t": self.exc_type, "v": self.reply})

    @classmethod
    def decode(cls, data: bytes) -> Outcome:
        """The report in ``data``; RemoteProtocolError if it is not one."""
        try:
            value = msgpack.unpackb(data)
            status = OutcomeStatus(value["s"])
            reason, exc_type, reply = value["r"], value["t"], value["v"]
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise RemoteProtocolError(f"not an outcome report: {data[:64]!r} ({exc})") from exc
        for name, field in (("r", reason), ("t", exc_type)):
            if field is not None and not isinstance(field, str):
                raise RemoteProtocolError(f"outcome report field {name!r} must be a str or null, got {field!r}")
        if reply is not None and not isinstance(reply, bytes):
            raise RemoteProtocolError(f"outcome report reply must be bytes or null, got {reply!r}")
        return cls(status, reason, exc_type, reply)


@dataclass(frozen=True, slots=True)
class HandledBatch:
    """A batch report's content: the ids of messages every handler of which returned, with no reply."""

    ids: tuple[bytes, ...]

    def encode(self) -> bytes:
        """The report's payload bytes."""
        return msgpack.packb({"h": list(self.ids)})

    @classmethod
    def decode(cls, data: bytes) -> HandledBatch:
        """The batch in ``data``; RemoteProtocolError if it is not one."""
        try:
            ids = msgpack.unpackb(data)["h"]
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise RemoteProtocolError(f"not a batch report: {data[:64]!r} ({exc})") from exc
        if not isinstance(ids, list) or not 0 < len(ids) <= OUTCOMES_PER_REPORT:
            raise RemoteProtocolError(f"a batch report holds 1 to {OUTCOMES_PER_REPORT} ids, got {ids!r:.80}")
        for one in ids:
            if not isinstance(one, bytes):
                raise RemoteProtocolError(f"a batch report's ids must be bytes, got {one!r:.80}")
        return cls(tuple(ids))


@codec.message("app.BridgeQuery")
@dataclass(frozen=True, slots=True)
class BridgeQuery:
    """Ask ``query`` (``peers``, ``suitable_peers``, ``retrier_status``) of the node's actors on behalf
    of an asyncio caller; the answer resolves the caller's future ``token`` on its loop."""

    token: int
    query: str
    argument: int = 0


@dataclass(frozen=True, slots=True)
class CoroutineDone:
    """A coroutine handler of ``message_id`` ended (told from its event loop's thread)."""

    message_id: bytes
    kind: str
    handler: Any
    future: Future[Any]


@dataclass(frozen=True, slots=True)
class OutcomeDue:
    """Timer: end the acked sends whose outcome report is overdue."""
