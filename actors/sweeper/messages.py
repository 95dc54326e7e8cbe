"""The discovery sweeper's messages (besides the transport contract's Discover/Discovered)."""

from __future__ import annotations

from dataclasses import dataclass

from villagemesh.actors.core import codec
from villagemesh.actors.core.transport import Sighting

__all__ = ["RoundDeadline", "Sighted", "SweepNow", "SweepStatus", "SweepStatusReply"]


@codec.message("sweeper.SweepNow")
@dataclass(frozen=True, slots=True)
class SweepNow:
    """Start a round now (also what the sweeper's own timer sends)."""


@codec.message("sweeper.RoundDeadline")
@dataclass(frozen=True, slots=True)
class RoundDeadline:
    """Timer: the round's time is up."""

    round: int


@codec.message("sweeper.Sighted")
@dataclass(frozen=True, slots=True)
class Sighted:
    """To the registry: peers one transport found in one round."""

    sightings: tuple[Sighting, ...]


@codec.message("sweeper.Status")
@dataclass(frozen=True, slots=True)
class SweepStatus:
    """Ask: how many rounds have closed, and how the last one ended."""


@codec.message("sweeper.StatusReply")
@dataclass(frozen=True, slots=True)
class SweepStatusReply:
    rounds: int
    answered: tuple[str, ...]
    failed: dict[str, str]
    timed_out: tuple[str, ...]
    sightings: int
