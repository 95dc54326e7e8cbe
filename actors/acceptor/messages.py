"""The acceptor actor's whole protocol on the bus.

``ConnectionHandedOff`` carries a *file descriptor*: a connection the acceptor
sniffed, for the actor that owns its route. It is valid only inside this
process (the bus is inproc; a process-isolated child cannot take one). The
receiver owns the descriptor from then on: it adopts it
(``socket.socket(fileno=fd)`` + :func:`~villagemesh.actors.acceptor.server.adopt`)
or closes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from villagemesh.actors import codec

__all__ = ["AcceptorStatus", "ConnectionHandedOff", "GetAcceptorStatus"]


@codec.message("acceptor.ConnectionHandedOff")
@dataclass(frozen=True, slots=True)
class ConnectionHandedOff:
    """A sniffed connection for its route's owner: adopt ``fd``, feed ``peeked`` first."""

    route: str
    fd: int
    peeked: bytes
    peer: str


@codec.message("acceptor.GetStatus")
@dataclass(frozen=True, slots=True)
class GetAcceptorStatus:
    """Ask: where is the acceptor listening, and what has it seen?"""


@codec.message("acceptor.Status")
@dataclass(frozen=True, slots=True)
class AcceptorStatus:
    """The reply to :class:`GetAcceptorStatus`: address, undecided-or-routed open count, counters."""

    host: str
    port: int
    open: int
    counts: dict[str, int]
