"""The BetaNet relay actor's whole protocol.

On the bus it speaks the transport contract (:mod:`villagemesh.actors.core.transport`):
``Transmit`` → ``TransmitResult``, ``Received`` to ``deliver_to``, ``Discover`` →
``Discovered`` (empty: mixnodes are learnt from the registry), and it takes
``ConnectionHandedOff`` for the acceptor's SECURE route (mix links). It asks
the registry for routes with ``ListRoutes`` (reply ``RoutesList``). Its own:
:class:`GetBetanetStatus` → :class:`BetanetStatus`. The rest are timer
messages it schedules for itself (time is a message).
"""

from __future__ import annotations

from dataclasses import dataclass

from villagemesh.actors.core import codec

__all__ = ["BetanetStatus", "CoverDue", "EpochTick", "ForwardDue", "GetBetanetStatus", "RefreshMixnodes"]


@codec.message("betanet.GetStatus")
@dataclass(frozen=True, slots=True)
class GetBetanetStatus:
    """Ask: what is the relay doing?"""


@codec.message("betanet.Status")
@dataclass(frozen=True, slots=True)
class BetanetStatus:
    """The reply: this mix's address, the epoch, mixnodes known, packets held, and its counters."""

    address: str
    epoch: int
    mixnodes: int
    held: int
    counts: dict[str, int]


@dataclass(frozen=True, slots=True)
class ForwardDue:
    """Timer: held packets may be due."""


@dataclass(frozen=True, slots=True)
class CoverDue:
    """Timer: send one cover packet of ``kind`` (``loop`` or ``drop``)."""

    kind: str


@dataclass(frozen=True, slots=True)
class RefreshMixnodes:
    """Timer: ask the registry for the mixnodes again."""


@dataclass(frozen=True, slots=True)
class EpochTick:
    """Timer: an epoch boundary has passed (new replay cache, oldest one gone)."""
