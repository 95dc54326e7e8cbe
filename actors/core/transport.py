"""The transport contract: the messages every transport actor speaks.

A transport actor (WebSocket today; libp2p, BitChat and BetaNet next) moves
encoded envelopes (:func:`villagemesh.protocols.envelope.encode_message`) to
and from peers, and finds peers. It never decides *whether* or *where* to send:
the delivery retrier does that and tells it::

    retrier ──TransmitMany──► transport ──TransmitResult──► retrier   (a turn's sends: one message)
    transport ──ReceivedMany──────────────────────────────► retrier   (a pass of inbound envelopes)
    sweeper ──Discover──► transport ──Discovered──► sweeper ──Sighted──► registry
    acceptor ──ConnectionHandedOff──► transport   (a connection sniffed as its protocol; see actors.core.handoff)

Its bus name is its transport name (``websocket``, ``libp2p``, ``bitchat``,
``betanet``), so the retrier finds it by the names in the network mode's
order. Addresses are URLs whose scheme names the transport
(``ws://127.0.0.1:7000``, ``/ip4/…`` multiaddrs for libp2p, …).

A transport takes a ``Transmit`` alone or many in one ``TransmitMany`` (parallel tuples;
iterating gives each as a ``Transmit``), and tells what arrived as a ``Received`` or, for
several read together, one ``ReceivedMany``: one bus message a turn rather than one an
envelope, since building, packing and unpacking a message each costs about as much as the
rest of a hop (~1.8 µs a message against ~0.1 for the parallel tuples).

``TransmitResult.retryable`` follows urllib3's distinction: False when the
peer may have received the bytes (the retrier then waits for the end-to-end
ack rather than resending at once), True when it surely did not (connection
refused): safe to try the next transport right away.

:mod:`tests.actors.transport_contract` runs the same checks on every
transport that claims this contract.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from villagemesh.actors.core import codec
from villagemesh.errors import ConnectError, VillageMeshError

__all__ = [
    "REPLY_ADDRESS",
    "TRANSPORT_NAMES",
    "ConnectionHandedOff",
    "Discover",
    "Discovered",
    "Received",
    "ReceivedMany",
    "Sighting",
    "Transmit",
    "TransmitMany",
    "TransmitResult",
    "group_transmits",
    "is_transport_failure",
    "transmit_outcome",
]

TRANSPORT_NAMES = ("libp2p", "bitchat", "betanet", "websocket")
"""Every transport a network mode can name; each is also its actor's bus name."""


REPLY_ADDRESS = ""
"""``Transmit.address`` meaning "on a connection ``peer_id`` already has open to us" (the one
a message came in on): how an ack goes back to a sender this node has no route to yet. A
transport with no such connection answers a retryable ``ConnectError``."""


@codec.message("acceptor.ConnectionHandedOff")
@dataclass(frozen=True, slots=True)
class ConnectionHandedOff:
    """A sniffed connection for its route's owner: adopt ``fd``, feed ``peeked`` first.

    It carries a *file descriptor*, valid only inside this process (the bus is
    inproc; a process-isolated child cannot take one). The receiver owns the
    descriptor from then on: it adopts it (``socket.socket(fileno=fd)`` +
    :func:`villagemesh.actors.core.handoff.adopt`) or closes it. The wire name
    stays ``acceptor.ConnectionHandedOff``: the acceptor sends it"""

    route: str
    fd: int
    peeked: bytes
    peer: str


@codec.message("transport.Transmit")
@dataclass(frozen=True, slots=True)
class Transmit:
    """Send one encoded envelope to ``address`` of ``peer_id``; answer with TransmitResult.

    ``address`` is :data:`REPLY_ADDRESS` for "on the peer's own open connection to us".
    """

    message_id: bytes
    peer_id: str
    address: str
    envelope: bytes
    reply_to: str
    """Bus name of the actor that wants the TransmitResult (the retrier)."""
    report_success: bool = True
    """False: answer only a failure. The retrier asks for that: a success tells it
    nothing it acts on (the end-to-end ack settles the attempt), and not reporting
    it saves two thread hops per envelope (loop to actor, actor to retrier)."""


@codec.message("transport.TransmitMany")
@dataclass(frozen=True, slots=True)
class TransmitMany:
    """Several Transmits in one message, in order: ``message_ids[i]`` to ``address[i]`` of ``peer_ids[i]``.

    Parallel tuples (one ``reply_to`` and ``report_success`` for all); iterating gives each
    as a :class:`Transmit`, which is how a transport answers for it.
    """

    message_ids: tuple[bytes, ...]
    peer_ids: tuple[str, ...]
    addresses: tuple[str, ...]
    envelopes: tuple[bytes, ...]
    reply_to: str
    report_success: bool = True

    def __iter__(self) -> Iterator[Transmit]:
        reply_to, report = self.reply_to, self.report_success
        return (
            Transmit(m, p, a, e, reply_to, report)
            for m, p, a, e in zip(self.message_ids, self.peer_ids, self.addresses, self.envelopes, strict=True)
        )

    def __len__(self) -> int:
        return len(self.message_ids)


@codec.message("transport.TransmitResult")
@dataclass(frozen=True, slots=True)
class TransmitResult:
    """What became of one Transmit."""

    message_id: bytes
    transport: str
    peer_id: str
    ok: bool
    retryable: bool
    error: str | None


@codec.message("transport.Received")
@dataclass(frozen=True, slots=True)
class Received:
    """An envelope arrived from a peer (not yet decoded: the retrier decodes and dedups)."""

    transport: str
    envelope: bytes
    remote: str
    """Where it came from, as the transport sees it (an address or a connection label)."""


@codec.message("transport.ReceivedMany")
@dataclass(frozen=True, slots=True)
class ReceivedMany:
    """Envelopes that arrived together on ``transport``, in arrival order: ``envelopes[i]`` from ``remotes[i]``.

    Parallel tuples; iterating gives each as a :class:`Received`.
    """

    transport: str
    envelopes: tuple[bytes, ...]
    remotes: tuple[str, ...]

    def __iter__(self) -> Iterator[Received]:
        transport = self.transport
        return (Received(transport, e, r) for e, r in zip(self.envelopes, self.remotes, strict=True))

    def __len__(self) -> int:
        return len(self.envelopes)


@codec.message("transport.Sighting")
@dataclass(frozen=True, slots=True)
class Sighting:
    """One peer found by a transport's discovery: a verified signed announce."""

    transport: str
    announce: str
    """The announce/response JSON exactly as received (its signature was verified)."""
    latency_ms: float | None


@codec.message("transport.Discover")
@dataclass(frozen=True, slots=True)
class Discover:
    """Run one round of this transport's discovery and tell ``reply_to`` a Discovered.

    The round must not block the transport's actor (run it on the transport's own
    I/O loop); the sweeper stops waiting after ``timeout`` seconds either way.
    """

    round: int
    timeout: float
    reply_to: str


@codec.message("transport.Discovered")
@dataclass(frozen=True, slots=True)
class Discovered:
    """What one round of a transport's discovery found."""

    round: int
    transport: str
    sightings: tuple[Sighting, ...]
    errors: tuple[str, ...]


def group_transmits(sends: Iterable[Transmit | TransmitMany]) -> dict[tuple[str, str, bool], list[Transmit]]:
    """The Transmits of ``sends`` by peer, address and ``report_success``, each group in order:
    what a transport writes to one connection at once."""
    groups: dict[tuple[str, str, bool], list[Transmit]] = {}
    for send in sends:
        for t in (send,) if isinstance(send, Transmit) else send:
            key = (t.peer_id, t.address, t.report_success)
            group = groups.get(key)
            if group is None:
                groups[key] = [t]
            else:
                group.append(t)
    return groups


def is_transport_failure(error: BaseException) -> bool:
    """A send's error that is an answer (ours, or a cancellation), not a bug."""
    return isinstance(error, VillageMeshError | asyncio.CancelledError)


def transmit_outcome(transport: str, request: Transmit, error: BaseException | None) -> TransmitResult:
    """The retrier's answer for a Transmit on ``transport`` that ended with ``error``::

        None                         ok
        ConnectError                 failed, retryable (the peer surely did not get the bytes)
        other VillageMeshError,      failed, not retryable (the peer may have them)
        CancelledError
        anything else                raised again: a bug, for the actor's supervisor to see
    """

    def result(ok: bool, retryable: bool, reason: str | None) -> TransmitResult:
        return TransmitResult(request.message_id, transport, request.peer_id, ok, retryable, reason)

    if error is None:
        return result(True, False, None)
    if isinstance(error, ConnectError):
        return result(False, True, f"ConnectError: {error}")
    if is_transport_failure(error):
        return result(False, False, f"{type(error).__name__}: {error}")
    raise error
