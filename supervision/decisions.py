"""The supervisor's decisions as small pure functions (tested with hypothesis).

* :func:`add_restart` is OTP's ``add_restart/3``: a sliding window of restart
  times; more than ``intensity`` restarts within ``period`` seconds means the
  supervisor gives up and escalates.
* :func:`plan` says which children to stop (in reverse start order) and which to
  start again (in start order) when one child ends, for each strategy.
* :func:`should_restart` applies permanent / transient / temporary.
* :func:`backoff_delay` is the capped exponential delay with jitter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from villagemesh.supervision.spec import Backoff, Restart, Strategy

__all__ = ["Plan", "add_restart", "backoff_delay", "plan", "should_restart"]


def add_restart(
    history: tuple[float, ...], now: float, intensity: int, period: float
) -> tuple[tuple[float, ...], bool]:
    """Record a restart at ``now``; return the new window and whether it exceeds the intensity.

    The window keeps the restart times within the last ``period`` seconds
    (``now - t < period``), newest last. It is exceeded when it holds more than
    ``intensity`` restarts.
    """
    window = (*(t for t in history if now - t < period), now)
    return window, len(window) > intensity


def should_restart(restart: Restart, crashed: bool) -> bool:
    """Whether a child that ended (crashed or not) is started again."""
    if restart is Restart.PERMANENT:
        return True
    if restart is Restart.TRANSIENT:
        return crashed
    return False


@dataclass(frozen=True)
class Plan:
    """What a supervisor does when ``failed`` ended and is to be restarted."""

    stop: tuple[str, ...]
    """Running siblings to stop first, in reverse start order."""
    start: tuple[str, ...]
    """Children to start again, in start order (``failed`` among them)."""


def plan(strategy: Strategy, order: Sequence[str], failed: str) -> Plan:
    """The restart plan for ``failed`` among ``order`` (the children in start order)."""
    if failed not in order:
        raise ValueError(f"child {failed!r} is not among {list(order)}")
    if strategy is Strategy.ONE_FOR_ONE:
        return Plan(stop=(), start=(failed,))
    affected = tuple(order) if strategy is Strategy.ONE_FOR_ALL else tuple(order[order.index(failed) :])
    others = tuple(c for c in affected if c != failed)
    return Plan(stop=tuple(reversed(others)), start=affected)


def backoff_delay(backoff: Backoff | None, consecutive: int, rand: float) -> float:
    """Seconds to wait before restart number ``consecutive`` (0-based); ``rand`` in [0, 1)."""
    if backoff is None:
        return 0.0
    base = min(backoff.maximum, backoff.initial * backoff.multiplier ** min(consecutive, 64))
    return base * (1.0 - backoff.jitter * rand)
