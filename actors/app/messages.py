"""The application gateway's whole protocol.

On the bus it speaks the retrier's application protocol, defined by its owner in
:mod:`villagemesh.actors.retrier.messages`: it receives ``Incoming`` (a new,
deduplicated message to dispatch), ``MessageDelivered`` and ``MessageFailed``
(the end of one of this node's sends). It sends nothing on the bus.

Its one message of its own never crosses the bus: :class:`CoroutineDone` is put
straight into the gateway instance's pykka inbox from the event loop a coroutine
handler ran on (it holds a ``Future``, which no codec could carry), so the mark
"handled" is committed in the gateway's thread.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

__all__ = ["CoroutineDone"]


@dataclass(frozen=True, slots=True)
class CoroutineDone:
    """A coroutine handler of ``message_id`` ended (told from its event loop's thread)."""

    message_id: bytes
    kind: str
    handler: Any
    future: Future[Any]
