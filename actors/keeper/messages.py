"""The keeper's messages."""

from __future__ import annotations

from dataclasses import dataclass

from villagemesh.actors.core import codec

__all__ = ["CheckpointDue", "CheckpointNow", "Checkpointed"]


@codec.message("keeper.CheckpointDue")
@dataclass(frozen=True, slots=True)
class CheckpointDue:
    """Timer: time to checkpoint every store whose log grew."""


@codec.message("keeper.CheckpointNow")
@dataclass(frozen=True, slots=True)
class CheckpointNow:
    """Ask: checkpoint every store now, grown or not; the reply is :class:`Checkpointed`."""


@codec.message("keeper.Checkpointed")
@dataclass(frozen=True, slots=True)
class Checkpointed:
    """Each store's generation after the checkpoint (a store whose checkpoint could not complete keeps its old one)."""

    generations: dict[str, int]
