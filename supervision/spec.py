"""Child specs and supervisor specs, validated before anything starts (OTP's ``check_childspec``).

A :class:`ChildSpec` says how to start one child and when to bring it back:

========== ==========================================================
restart    permanent: always restarted; transient: restarted only after
           a crash; temporary: never restarted
shutdown   seconds the child gets to stop before it is abandoned (a
           thread) or killed with SIGKILL (a process)
isolation  thread: an actor thread in the node's process; process: the
           same actor class in a child process reached over ipc://
backoff    optional capped exponential delay before each restart
========== ==========================================================

A :class:`SupervisorSpec` is a child too: supervisors nest.
"""

from __future__ import annotations

import enum
import importlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from villagemesh.errors import ChildSpecError

if TYPE_CHECKING:
    from villagemesh.actors.core.base import Actor

__all__ = ["Backoff", "ChildSpec", "Isolation", "Restart", "Strategy", "SupervisorSpec"]


class Restart(enum.Enum):
    """When a child that ended is started again."""

    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


class Isolation(enum.Enum):
    """Where a child runs."""

    THREAD = "thread"
    PROCESS = "process"


class Strategy(enum.Enum):
    """Which children restart when one of them fails."""

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


@dataclass(frozen=True)
class Backoff:
    """Capped exponential delay before a restart: ``min(maximum, initial * multiplier**n)``,
    then up to ``jitter`` of it removed at random (so restarts of many children spread out)."""

    initial: float = 0.01
    maximum: float = 1.0
    multiplier: float = 2.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        for name in ("initial", "maximum"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ChildSpecError(f"backoff {name} must be a finite number >= 0, got {value!r}")
        if self.maximum < self.initial:
            raise ChildSpecError(f"backoff maximum {self.maximum!r} is below initial {self.initial!r}")
        if not (isinstance(self.multiplier, int | float) and self.multiplier >= 1):
            raise ChildSpecError(f"backoff multiplier must be >= 1, got {self.multiplier!r}")
        if not (isinstance(self.jitter, int | float) and 0 <= self.jitter <= 1):
            raise ChildSpecError(f"backoff jitter must be within [0, 1], got {self.jitter!r}")


def _enum(cls: type[enum.Enum], value: Any, what: str) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise ChildSpecError(f"{what} must be one of {choices}; got {value!r}") from None


@dataclass(frozen=True)
class ChildSpec:
    """How to start one actor child, and when to restart it.

    ``factory`` is an :class:`~villagemesh.actors.core.base.Actor` subclass; it is
    started as ``factory.start(ctx)`` with an :class:`ActorContext` whose
    ``name`` is ``name`` (default: ``id``) and whose ``config`` is ``config``.
    For ``isolation="process"`` the class must be importable by its module path
    and ``config`` must hold only msgpack-able values (it crosses a process
    boundary without pickle).
    """

    id: str
    factory: type[Actor]
    restart: Restart | str = Restart.PERMANENT
    shutdown: float = 5.0
    isolation: Isolation | str = Isolation.THREAD
    config: Mapping[str, Any] = field(default_factory=dict)
    backoff: Backoff | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        from villagemesh.actors.core.base import Actor

        if not isinstance(self.id, str) or not self.id or self.id.startswith("_") or "/" in self.id:
            raise ChildSpecError(f"child id must be a non-empty string without '/' or a leading '_', got {self.id!r}")
        object.__setattr__(self, "restart", _enum(Restart, self.restart, f"child {self.id!r}: restart"))
        object.__setattr__(self, "isolation", _enum(Isolation, self.isolation, f"child {self.id!r}: isolation"))
        if not (isinstance(self.factory, type) and issubclass(self.factory, Actor)):
            raise ChildSpecError(f"child {self.id!r}: factory must be an Actor subclass, got {self.factory!r}")
        if not (isinstance(self.shutdown, int | float) and math.isfinite(self.shutdown) and self.shutdown > 0):
            raise ChildSpecError(
                f"child {self.id!r}: shutdown must be a positive number of seconds, got {self.shutdown!r}"
            )
        if self.backoff is not None and not isinstance(self.backoff, Backoff):
            raise ChildSpecError(f"child {self.id!r}: backoff must be a Backoff or None, got {self.backoff!r}")
        if not isinstance(self.config, Mapping):
            raise ChildSpecError(f"child {self.id!r}: config must be a mapping, got {type(self.config).__name__}")
        object.__setattr__(self, "config", dict(self.config))
        if self.name is not None and (not isinstance(self.name, str) or not self.name or self.name.startswith("_")):
            raise ChildSpecError(f"child {self.id!r}: name must be a non-empty string without a leading '_'")
        if self.isolation is Isolation.PROCESS:
            self._check_process_child()

    @property
    def bus_name(self) -> str:
        """The name the child's mailbox has on the bus."""
        return self.name or self.id

    @property
    def target(self) -> str:
        """``module:QualName`` of the factory (how a process child finds it)."""
        return f"{self.factory.__module__}:{self.factory.__qualname__}"

    def _check_process_child(self) -> None:
        from villagemesh.actors.core import codec

        module_name, qualname = self.factory.__module__, self.factory.__qualname__
        if "<locals>" in qualname or module_name == "__main__":
            raise ChildSpecError(
                f"child {self.id!r}: a process child's factory must be importable, got {module_name}:{qualname}"
            )
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        if obj is not self.factory:
            raise ChildSpecError(f"child {self.id!r}: {module_name}:{qualname} does not name the factory")
        try:
            codec.pack(self.config)
        except Exception as exc:
            raise ChildSpecError(f"child {self.id!r}: config cannot cross a process boundary: {exc}") from exc


@dataclass(frozen=True)
class SupervisorSpec:
    """A supervisor: its children (started in order, stopped in reverse), strategy and intensity.

    ``intensity`` restarts are allowed within ``period`` seconds (OTP's default:
    1 in 5 s); one more and the supervisor stops its children and fails, which its
    own parent sees as a crash (escalation).
    """

    id: str
    children: Sequence[ChildSpec | SupervisorSpec]
    strategy: Strategy | str = Strategy.ONE_FOR_ONE
    intensity: int = 1
    period: float = 5.0
    restart: Restart | str = Restart.PERMANENT
    shutdown: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id or self.id.startswith("_") or "/" in self.id:
            raise ChildSpecError(
                f"supervisor id must be a non-empty string without '/' or a leading '_', got {self.id!r}"
            )
        object.__setattr__(self, "strategy", _enum(Strategy, self.strategy, f"supervisor {self.id!r}: strategy"))
        object.__setattr__(self, "restart", _enum(Restart, self.restart, f"supervisor {self.id!r}: restart"))
        if isinstance(self.intensity, bool) or not isinstance(self.intensity, int) or self.intensity < 0:
            raise ChildSpecError(f"supervisor {self.id!r}: intensity must be an int >= 0, got {self.intensity!r}")
        if not (isinstance(self.period, int | float) and math.isfinite(self.period) and self.period > 0):
            raise ChildSpecError(f"supervisor {self.id!r}: period must be positive seconds, got {self.period!r}")
        if not (isinstance(self.shutdown, int | float) and math.isfinite(self.shutdown) and self.shutdown > 0):
            raise ChildSpecError(f"supervisor {self.id!r}: shutdown must be positive seconds, got {self.shutdown!r}")
        children = tuple(self.children)
        for child in children:
            if not isinstance(child, ChildSpec | SupervisorSpec):
                raise ChildSpecError(f"supervisor {self.id!r}: children must be specs, got {child!r}")
        ids = [c.id for c in children]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ChildSpecError(f"supervisor {self.id!r}: duplicate child ids {duplicates}")
        object.__setattr__(self, "children", children)

    @property
    def isolation(self) -> Isolation:
        """Supervisors always run as threads."""
        return Isolation.THREAD

    @property
    def backoff(self) -> None:
        """Supervisors restart without backoff."""
        return None
