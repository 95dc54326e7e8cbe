"""The discovery sweeper actor: every transport's discovery at once, one failing never stops the others.

Config (``ChildSpec.config``): ``transports`` (bus names, in the network mode's
order), ``interval`` (seconds between rounds, default 5), ``timeout``
(seconds a round waits, default 3), ``registry`` (bus name, default
``registry``), ``first_delay`` (seconds before the first round, default 0),
``fast_start`` (the first gap between rounds, doubling up to ``interval``;
default 0: every gap is ``interval``; see :func:`~.state.round_gap`).

A round tells every transport ``Discover`` and schedules its own deadline;
answers (``Discovered``) are passed on to the registry as they come; at the
deadline, or as soon as all answered, the round closes with one
``discovery_round`` event naming who answered, failed and timed out.
"""

from __future__ import annotations

from typing import Any

from villagemesh.actors.core.base import Actor, ActorContext
from villagemesh.actors.core.transport import Discover, Discovered
from villagemesh.actors.sweeper.messages import RoundDeadline, Sighted, SweepNow, SweepStatus, SweepStatusReply
from villagemesh.actors.sweeper.state import Outcome, SweepState, round_gap
from villagemesh.errors import BusError

__all__ = ["SweeperActor"]


class SweeperActor(Actor):
    """Runs discovery rounds across transports."""

    def __init__(self, ctx: ActorContext) -> None:
        super().__init__(ctx)
        cfg = ctx.config
        self.state = SweepState(tuple(cfg.get("transports", ())))
        self.interval = float(cfg.get("interval", 5.0))
        self.timeout = float(cfg.get("timeout", 3.0))
        self.registry = str(cfg.get("registry", "registry"))
        self.first_delay = float(cfg.get("first_delay", 0.0))
        self.fast_start = float(cfg.get("fast_start", 0.0))
        self.last: Outcome | None = None
        self.rounds = 0
        self.late = 0
        """Answers that came after their round closed (their sightings were still used)."""

    def on_start(self) -> None:
        self._next = self.schedule(self.first_delay, SweepNow())

    def handle(self, msg: Any) -> Any:
        if isinstance(msg, SweepNow):
            self._sweep()
        elif isinstance(msg, Discovered):
            self._discovered(msg)
        elif isinstance(msg, RoundDeadline):
            self._close(msg.round)
        elif isinstance(msg, SweepStatus):
            last = self.last
            if last is None:
                return SweepStatusReply(self.rounds, (), {}, (), 0)
            return SweepStatusReply(self.rounds, last.answered, last.failed, last.timed_out, last.sightings)
        else:
            raise TypeError(f"sweeper got an unexpected {type(msg).__name__}")
        return None

    def _sweep(self) -> None:
        if self.state.open:
            return  # a manual SweepNow during a round: that round is the sweep
        self._next.cancel()
        round_ = self.state.start()
        for transport in self.state.transports:
            try:
                self.tell(transport, Discover(round_, self.timeout, self.name), timeout=self.timeout)
            except BusError as exc:
                self.state.could_not_ask(transport, f"{type(exc).__name__}: {exc}")
        self.schedule(self.timeout, RoundDeadline(round_))
        if self.state.complete:
            self._close(round_)

    def _discovered(self, msg: Discovered) -> None:
        # Sightings are facts whenever they arrive: a late answer still reaches the
        # registry; only the round's bookkeeping ignores it.
        if msg.sightings:
            self.tell(self.registry, Sighted(msg.sightings))
        if not self.state.answered(msg.round, msg.transport, len(msg.sightings), msg.errors):
            self.late += 1
            return
        if self.state.complete:
            self._close(msg.round)

    def _close(self, round_: int) -> None:
        outcome = self.state.close(round_)
        if outcome is None:
            return
        self.last = outcome
        self.rounds += 1
        self.ctx.log.emit(
            "discovery_round",
            level="warning" if outcome.failed or outcome.timed_out else "info",
            round=outcome.round,
            answered=list(outcome.answered),
            failed=outcome.failed,
            timed_out=list(outcome.timed_out),
            sightings=outcome.sightings,
        )
        self._next = self.schedule(round_gap(self.rounds, self.interval, self.fast_start), SweepNow())
