"""The acceptor actor's whole protocol on the bus: its status.

The connections it hands off travel as
:class:`villagemesh.actors.core.transport.ConnectionHandedOff` (the transport
contract, since every route owner receives them).
"""

from __future__ import annotations

from dataclasses import dataclass

from villagemesh.actors.core import codec

__all__ = ["AcceptorStatus", "GetAcceptorStatus"]


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
