"""The discovery sweeper's pure bookkeeping: rounds, who answered, who timed out.

Each sweep is a *round*: every enabled transport is asked to discover at once,
and the round closes at its deadline whatever happened. A transport that fails,
hangs or is missing only marks itself in that round's outcome; the others'
results are used as they arrive. Rounds never overlap: the next one starts
``interval`` seconds after the previous one closed; with a fast start
(:func:`round_gap`) the first gaps are shorter, doubling up to ``interval``
(a node that just started, or whose seeds were not up yet, finds its peers in
well under a second, then settles to the steady pace).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Outcome", "SweepState", "round_gap"]


def round_gap(rounds_done: int, interval: float, fast_start: float) -> float:
    """Seconds between the close of round ``rounds_done`` (1-based) and the next round's start:
    ``fast_start`` doubling per round, capped at ``interval`` (just ``interval`` when
    ``fast_start`` is 0)."""
    if fast_start <= 0:
        return interval
    return min(interval, fast_start * 2.0 ** min(max(rounds_done - 1, 0), 64))


@dataclass(frozen=True)
class Outcome:
    """How one round ended."""

    round: int
    answered: tuple[str, ...]
    failed: dict[str, str]
    """transport -> why (it could not be asked, or it reported errors)."""
    timed_out: tuple[str, ...]
    sightings: int


@dataclass
class SweepState:
    """Rounds of discovery; ``now`` is always given, never read."""

    transports: tuple[str, ...]
    round: int = 0
    open: bool = False
    _waiting: set[str] = field(default_factory=set)
    _answered: list[str] = field(default_factory=list)
    _failed: dict[str, str] = field(default_factory=dict)
    _sightings: int = 0

    def start(self) -> int:
        """Open the next round; every transport is now awaited. Returns the round number."""
        if self.open:
            raise RuntimeError(f"round {self.round} is still open")
        self.round += 1
        self.open = True
        self._waiting = set(self.transports)
        self._answered, self._failed, self._sightings = [], {}, 0
        return self.round

    def could_not_ask(self, transport: str, why: str) -> None:
        """The transport could not even be asked (no such actor, mailbox full)."""
        self._waiting.discard(transport)
        self._failed[transport] = why

    def answered(self, round_: int, transport: str, sightings: int, errors: Iterable[str]) -> bool:
        """Record an answer; False when it belongs to a closed round or an unknown transport (ignored)."""
        if not self.open or round_ != self.round or transport not in self._waiting:
            return False
        self._waiting.discard(transport)
        self._answered.append(transport)
        self._sightings += sightings
        errors = tuple(errors)
        if errors:
            self._failed[transport] = "; ".join(errors)
        return True

    @property
    def complete(self) -> bool:
        """Every transport answered or failed: the round can close before its deadline."""
        return self.open and not self._waiting

    def close(self, round_: int) -> Outcome | None:
        """Close the round (at its deadline or when complete); None if it is already closed."""
        if not self.open or round_ != self.round:
            return None
        self.open = False
        return Outcome(
            round=round_,
            answered=tuple(self._answered),
            failed=dict(self._failed),
            timed_out=tuple(t for t in self.transports if t in self._waiting),
            sightings=self._sightings,
        )
