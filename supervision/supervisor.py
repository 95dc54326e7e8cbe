"""The supervisor: OTP's ``supervisor`` behaviour on pykka actors.

A :class:`Supervisor` is itself a supervised actor. It starts its children in
order, stops them in reverse, and when one ends it applies, in this order:

1. **restart type** (permanent / transient / temporary; :func:`should_restart`);
2. **intensity**: the restart is recorded in a sliding window; more than
   ``intensity`` restarts within ``period`` seconds → ``restart_intensity_exceeded``,
   every child is stopped in reverse order, ``supervisor_escalated`` is logged and
   the supervisor itself fails with :class:`RestartIntensityExceeded`, which its
   parent sees as a crash of one of its children (escalation);
3. **strategy** (one_for_one / one_for_all / rest_for_one; :func:`plan`): the
   affected running siblings are stopped in reverse order, then every affected
   child is started again in order, as a *new* instance built from its spec;
4. **backoff**: when the spec has one, the restart waits for a timer message
   (the supervisor never sleeps); the child's mailbox stays open meanwhile, so
   messages sent to it wait and go to the new instance.

Children learn nothing of this: a child reports its end through the watcher
the base class calls on every exit path (see :mod:`villagemesh.actors.core.base`).
A report from an instance the supervisor already replaced or stopped on
purpose is stale and ignored.

A thread child that does not stop within its ``shutdown`` seconds is abandoned
(Python threads cannot be killed; ``child_stopped`` says ``timeout``). Put code
that may hang in a process child: those are killed with SIGKILL.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pykka

from villagemesh.actors.core.base import ActorContext, ExitKind, ExitReport, Scheduler, Supervised, format_traceback
from villagemesh.actors.core.bus import Bus
from villagemesh.errors import RestartIntensityExceeded, SupervisionError
from villagemesh.supervision.decisions import add_restart, backoff_delay, plan, should_restart
from villagemesh.supervision.spec import ChildSpec, Isolation, Restart, Strategy, SupervisorSpec

__all__ = ["Environment", "Supervisor", "which_children"]

NESTED_ASK_TIMEOUT = 1.0
"""Seconds a supervisor waits for a nested supervisor's children when asked for its tree."""


@dataclass
class Environment:
    """What every supervisor of one node shares: the bus, the log, the timer thread,
    and (made on first use) the fork server for process children."""

    bus: Bus
    log: Any
    scheduler: Scheduler
    process_launcher: Callable[[], Any] | None = None
    """Returns the node's :class:`~villagemesh.supervision.process.ProcessLauncher`."""
    rand: Callable[[], float] = random.random


@dataclass(frozen=True)
class _ChildExit:
    child_id: str
    instance: str
    report: ExitReport


@dataclass(frozen=True)
class _RestartDue:
    child_ids: tuple[str, ...]
    backoff_s: float


@dataclass
class _Child:
    spec: ChildSpec | SupervisorSpec
    ref: pykka.ActorRef[Any] | None = None
    instance: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    restart_count: int = 0
    consecutive: int = 0
    started_at: float = 0.0
    pid: int | None = None
    actor: Supervised | None = None


LAUNCH_TIMEOUT_S = 30.0
"""How long :meth:`Supervisor.launch` waits for the supervisor's ``on_start`` (which opens mailboxes and
launches children without waiting for theirs: it takes milliseconds)."""


class Supervisor(Supervised):
    """Supervises the children of one :class:`SupervisorSpec`."""

    def __init__(
        self,
        spec: SupervisorSpec,
        env: Environment,
        *,
        parent: str | None = None,
        watcher: Any = None,
    ) -> None:
        super().__init__(watcher=watcher)
        self.spec = spec
        self.env = env
        self.parent = parent
        self._children: dict[str, _Child] = {c.id: _Child(c) for c in spec.children}
        self._history: tuple[float, ...] = ()

    @classmethod
    def launch(cls, *args: Any, **kwargs: Any) -> Any:
        """Start a supervisor and return once its ``on_start`` has run, as OTP's ``start_link`` returns
        after ``init``: every child's mailbox is open (a tell to any of them is queued, never
        ``NoSuchActor``) and every child is launched, each nested supervisor likewise (a worker's own
        ``on_start`` may still be running).

        Raises:
            SupervisionError: ``on_start`` did not return within :data:`LAUNCH_TIMEOUT_S`.
        """
        supervisor = super().launch(*args, **kwargs)
        if not supervisor.set_up.wait(LAUNCH_TIMEOUT_S):
            raise SupervisionError(f"supervisor {supervisor.spec.id!r} did not start within {LAUNCH_TIMEOUT_S} s")
        return supervisor

    # -- lifecycle ------------------------------------------------------------------------

    def on_start(self) -> None:
        for child in self._children.values():
            if isinstance(child.spec, ChildSpec):
                self.env.bus.open_mailbox(child.spec.bus_name)
        self.env.log.emit(
            "supervisor_started",
            supervisor=self.spec.id,
            parent=self.parent,
            strategy=Strategy(self.spec.strategy).value,
            intensity=self.spec.intensity,
            period_s=self.spec.period,
        )
        for child in list(self._children.values()):
            self._start(child)

    def on_stop(self) -> None:
        self._stop_all("shutdown")

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _ChildExit):
            self._on_exit(message)
        elif isinstance(message, _RestartDue):
            self._restart(message.child_ids, message.backoff_s)
        else:
            raise SupervisionError(f"supervisor {self.spec.id!r} got an unknown message {message!r}")

    # -- introspection (through a pykka proxy, with a timeout: see which_children) ---------

    def which_children(self) -> list[dict[str, Any]]:
        """One dict per child in start order: id, kind, instance, alive, ready (its ``on_start`` has
        returned), restart_count, isolation, pid; a supervisor child also has ``children``, its own
        list (asked with a timeout)."""
        rows = []
        for c in self._children.values():
            row: dict[str, Any] = {
                "id": c.spec.id,
                "kind": "supervisor" if isinstance(c.spec, SupervisorSpec) else "worker",
                "instance": c.instance,
                "alive": c.instance is not None,
                "ready": c.instance is not None and c.actor is not None and c.actor.started,
                "restart_count": c.restart_count,
                "isolation": Isolation(c.spec.isolation).value,
                "pid": c.pid,
            }
            if isinstance(c.spec, SupervisorSpec):
                row["children"] = self._nested(c)
            rows.append(row)
        return rows

    def _nested(self, child: _Child) -> list[dict[str, Any]]:
        if child.ref is None:
            return []
        try:
            return which_children(child.ref, timeout=NESTED_ASK_TIMEOUT)
        except (pykka.ActorDeadError, pykka.Timeout):
            return []  # it is restarting or busy: shown without its children this time

    def child_ref(self, child_id: str) -> pykka.ActorRef[Any] | None:
        """The running instance's ref of ``child_id`` (None while it is down)."""
        child = self._children.get(child_id)
        return child.ref if child is not None else None

    # -- starting ----------------------------------------------------------------------------

    def _start(self, child: _Child) -> None:
        spec = child.spec
        done = threading.Event()
        child.done = done
        child.pid = None
        child.actor = None
        child_id = spec.id

        def watcher(actor: Supervised, report: ExitReport) -> None:
            try:
                self.actor_ref.tell(_ChildExit(child_id, actor.instance, report))
            except pykka.ActorDeadError:
                # This supervisor is gone; it stopped its children itself and logged them.
                pass
            finally:
                done.set()

        try:
            actor = self._launch(spec, watcher)
        except Exception as exc:  # noqa: BLE001 - a factory that fails is a crash of the child
            instance = f"failed-{time.monotonic_ns()}"
            child.instance = instance
            child.ref = None
            done.set()
            report = ExitReport(instance, ExitKind.CRASH, type(exc).__name__, str(exc), _format(exc))
            self.actor_ref.tell(_ChildExit(child_id, instance, report))
            return
        child.ref = actor.actor_ref
        child.instance = actor.instance
        child.actor = actor
        child.pid = getattr(actor, "pid", None)
        child.started_at = time.monotonic()
        self.env.log.emit(
            "child_started",
            supervisor=self.spec.id,
            child_id=child_id,
            instance=child.instance,
            isolation=Isolation(spec.isolation).value,
            restart_count=child.restart_count,
            pid=child.pid,
        )

    def _launch(self, spec: ChildSpec | SupervisorSpec, watcher: Any) -> Supervised:
        if isinstance(spec, SupervisorSpec):
            return Supervisor.launch(spec, self.env, parent=self.spec.id, watcher=watcher)
        ctx = ActorContext(
            bus=self.env.bus,
            name=spec.bus_name,
            log=self.env.log,
            scheduler=self.env.scheduler,
            watcher=watcher,
            config=dict(spec.config),
        )
        if spec.isolation is Isolation.PROCESS:
            from villagemesh.supervision.process import ProcessHost

            if self.env.process_launcher is None:
                raise SupervisionError(f"child {spec.id!r} wants process isolation but the node has no launcher")
            return ProcessHost.launch(ctx, spec=spec, launcher=self.env.process_launcher())
        actor: Supervised = spec.factory.launch(ctx)
        return actor

    # -- exits -------------------------------------------------------------------------------

    def _on_exit(self, exit_: _ChildExit) -> None:
        child = self._children.get(exit_.child_id)
        if child is None or child.instance != exit_.instance:
            return  # stale: an instance this supervisor replaced or stopped on purpose
        report = exit_.report
        child.ref = None
        child.instance = None
        if report.crashed:
            self.env.log.emit(
                "child_crashed",
                level="error",
                supervisor=self.spec.id,
                child_id=child.spec.id,
                instance=exit_.instance,
                exc_type=report.exc_type,
                exc_message=report.exc_message,
                traceback=report.traceback,
            )
        else:
            self.env.log.emit(
                "child_stopped",
                supervisor=self.spec.id,
                child_id=child.spec.id,
                instance=exit_.instance,
                reason="normal",
            )
        if not should_restart(Restart(child.spec.restart), report.crashed):
            if child.spec.restart is Restart.TEMPORARY:
                self._forget(child)
            return
        now = time.monotonic()
        self._history, exceeded = add_restart(self._history, now, self.spec.intensity, self.spec.period)
        if exceeded:
            self._escalate(child)
        if now - child.started_at > self.spec.period:
            child.consecutive = 0
        order = [cid for cid in self._children]
        restart_plan = plan(Strategy(self.spec.strategy), order, child.spec.id)
        for sibling_id in restart_plan.stop:
            self._stop_child(self._children[sibling_id], "shutdown")
        delay = backoff_delay(getattr(child.spec, "backoff", None), child.consecutive, self.env.rand())
        child.consecutive += 1
        if delay > 0:
            self.env.log.emit(
                "child_restart_scheduled", supervisor=self.spec.id, child_id=child.spec.id, backoff_s=delay
            )
            self.env.scheduler.call_later(delay, self._tell_self, _RestartDue(restart_plan.start, delay))
        else:
            self._restart(restart_plan.start, 0.0)

    def _restart(self, child_ids: tuple[str, ...], backoff_s: float) -> None:
        for child_id in child_ids:
            child = self._children.get(child_id)
            if child is None or child.instance is not None:
                continue
            child.restart_count += 1
            self._start(child)
            if child.instance is not None and child.ref is not None:
                self.env.log.emit(
                    "child_restarted",
                    supervisor=self.spec.id,
                    child_id=child_id,
                    instance=child.instance,
                    restart_count=child.restart_count,
                    backoff_s=backoff_s,
                )

    def _tell_self(self, message: Any) -> None:
        try:
            self.actor_ref.tell(message)
        except pykka.ActorDeadError:
            return  # the supervisor stopped before the backoff ended: nothing to restart

    def _escalate(self, child: _Child) -> None:
        self.env.log.emit(
            "restart_intensity_exceeded",
            level="error",
            supervisor=self.spec.id,
            child_id=child.spec.id,
            intensity=self.spec.intensity,
            period_s=self.spec.period,
            restarts=len(self._history),
        )
        self._stop_all("shutdown")
        error = RestartIntensityExceeded(self.spec.id, child.spec.id, self.spec.intensity, self.spec.period)
        self.env.log.emit(
            "supervisor_escalated", level="error", supervisor=self.spec.id, parent=self.parent, reason=str(error)
        )
        raise error

    # -- stopping ------------------------------------------------------------------------------

    def _stop_all(self, reason: str) -> None:
        for child in reversed(list(self._children.values())):
            self._stop_child(child, reason)

    def _stop_child(self, child: _Child, reason: str) -> None:
        if child.instance is None:
            return
        instance, ref, done = child.instance, child.ref, child.done
        child.instance = None
        child.ref = None
        if ref is not None:
            try:
                ref.stop(block=False)
            except pykka.ActorDeadError:
                pass  # it is ending on its own; we wait for it below all the same
        finished = done.wait(child.spec.shutdown)
        self.env.log.emit(
            "child_stopped",
            supervisor=self.spec.id,
            child_id=child.spec.id,
            instance=instance,
            reason=reason if finished else "timeout",
        )

    def _forget(self, child: _Child) -> None:
        del self._children[child.spec.id]
        if isinstance(child.spec, ChildSpec):
            self.env.bus.close_mailbox(child.spec.bus_name)


def which_children(ref: pykka.ActorRef[Supervisor], *, timeout: float = 1.0) -> list[dict[str, Any]]:
    """Ask a running supervisor for its children (never waits longer than ``timeout``)."""
    return ref.proxy().which_children().get(timeout=timeout)


def _format(exc: BaseException) -> str:
    return format_traceback(exc, exc.__traceback__)
