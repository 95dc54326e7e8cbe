"""What the dashboard shows, folded from log records and status samples (pure: no I/O, no clock).

:class:`MeshView` takes the JSON objects of one or more nodes' event logs
(:meth:`~MeshView.add`, in file order) and the live figures of their status
endpoints (:meth:`~MeshView.add_status`), and answers :meth:`~MeshView.snapshot`:
one JSON-ready dict that the web page and ``villagemesh top`` both draw.

The supervision tree comes from the log alone (so a log copied from another
machine shows it too): ``supervisor_started`` names each supervisor's parent,
strategy and intensity; the six contract events (``docs/supervision-log.md``)
move each child through its states::

    child_started                    -> running     (isolation, pid, restart_count, instance)
    child_crashed                    -> restarting  (last crash: type, message, when, traceback)
    child_restart_scheduled          -> backing off (until its child_started)
    child_stopped                    -> stopped     (reason)
    supervisor_escalated             -> the supervisor: escalated (until its next supervisor_started)

Restarts in the intensity window are counted from ``child_restarted`` times
within the supervisor's ``period_s`` before ``now``. Everything kept is
bounded: the timeline holds the last :data:`TIMELINE` events, the chart the
last :data:`CHART_BUCKETS` buckets of :data:`BUCKET_S` seconds.
"""

from __future__ import annotations

import collections
import datetime
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BUCKET_S", "CHART_BUCKETS", "TIMELINE", "TIMELINE_EVENTS", "MeshView", "parse_time"]

TIMELINE = 2_000
"""Timeline events kept (the oldest go first)."""

BUCKET_S = 5.0
"""Seconds per chart bucket."""

CHART_BUCKETS = 120
"""Chart buckets kept: ten minutes."""

TIMELINE_EVENTS = frozenset(
    {
        "child_started",
        "child_crashed",
        "child_restarted",
        "child_stopped",
        "restart_intensity_exceeded",
        "supervisor_escalated",
        "supervisor_started",
        "child_restart_scheduled",
        "node_starting",
        "node_started",
        "node_stopped",
        "node_failed",
        "peer_discovered",
        "delivery_failed",
        "message_rejected",
        "message_poisoned",
    }
)
"""The events the timeline shows (the log holds more; these are the ones a person watches for)."""

RUNNING, RESTARTING, BACKING_OFF, STOPPED, ESCALATED = "running", "restarting", "backing off", "stopped", "escalated"


def parse_time(stamp: Any) -> float:
    """Seconds since the epoch of an ISO 8601 ``timestamp`` (0.0 when it is missing or malformed)."""
    if not isinstance(stamp, str):
        return 0.0
    try:
        return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


@dataclass
class _Child:
    supervisor: str
    child_id: str
    state: str = RUNNING
    instance: str | None = None
    isolation: str = "thread"
    pid: int | None = None
    restart_count: int = 0
    restarts: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=256))
    last_crash: dict[str, Any] | None = None
    stop_reason: str | None = None
    since: float = 0.0


@dataclass
class _Supervisor:
    supervisor: str
    parent: str | None = None
    strategy: str | None = None
    intensity: int | None = None
    period_s: float | None = None
    state: str = RUNNING
    escalations: int = 0
    last_escalation: dict[str, Any] | None = None
    children: dict[str, _Child] = field(default_factory=dict)


@dataclass
class _Sample:
    at: float
    status: dict[str, Any]


@dataclass
class _Node:
    name: str
    supervisors: dict[str, _Supervisor] = field(default_factory=dict)
    state: str = "unknown"
    last_event: float = 0.0
    status: _Sample | None = None
    previous: _Sample | None = None
    poisoned: int = 0


class MeshView:
    """The dashboard's state: every node's tree, the timeline, the chart, the latest figures."""

    def __init__(self) -> None:
        self._nodes: dict[str, _Node] = {}
        self.timeline: collections.deque[dict[str, Any]] = collections.deque(maxlen=TIMELINE)
        self._seq = 0
        self._restart_buckets: dict[int, int] = {}
        self._rate_buckets: dict[int, float] = {}
        self.records = 0

    # -- input ------------------------------------------------------------------------------------

    def add(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """Fold one log record in; returns its timeline entry (None when the timeline skips it)."""
        self.records += 1
        event = record.get("event")
        node_name = record.get("node")
        if not isinstance(event, str) or not isinstance(node_name, str):
            return None
        at = parse_time(record.get("timestamp"))
        node = self._node(node_name)
        node.last_event = max(node.last_event, at)
        handler = _HANDLERS.get(event)
        if handler is not None:
            handler(self, node, record, at)
        if event not in TIMELINE_EVENTS:
            return None
        self._seq += 1
        entry = {k: v for k, v in record.items() if k != "traceback"}
        entry["seq"] = self._seq
        entry["at"] = at
        if record.get("traceback"):
            entry["has_traceback"] = True
        self.timeline.append(entry)
        return entry

    def add_status(self, node_name: str, status: dict[str, Any], at: float) -> None:
        """The figures one node's status endpoint answered at ``at`` (seconds since the epoch)."""
        node = self._node(node_name)
        node.previous, node.status = node.status, _Sample(at, status)
        rate = self._rates(node).get("_total_in", 0.0)
        self._rate_buckets[_bucket(at)] = rate
        _trim(self._rate_buckets)

    def _node(self, name: str) -> _Node:
        node = self._nodes.get(name)
        if node is None:
            node = self._nodes[name] = _Node(name)
        return node

    # -- events -----------------------------------------------------------------------------------

    def _supervisor(self, node: _Node, sup_id: str) -> _Supervisor:
        sup = node.supervisors.get(sup_id)
        if sup is None:
            sup = node.supervisors[sup_id] = _Supervisor(sup_id)
        return sup

    def _child(self, node: _Node, record: dict[str, Any]) -> _Child:
        sup = self._supervisor(node, str(record.get("supervisor")))
        child_id = str(record.get("child_id"))
        child = sup.children.get(child_id)
        if child is None:
            child = sup.children[child_id] = _Child(sup.supervisor, child_id)
        return child

    def _supervisor_started(self, node: _Node, r: dict[str, Any], at: float) -> None:
        sup = self._supervisor(node, str(r.get("supervisor")))
        sup.parent = r.get("parent")
        sup.strategy = r.get("strategy")
        sup.intensity = r.get("intensity")
        sup.period_s = r.get("period_s")
        sup.state = RUNNING
        for child in sup.children.values():
            child.restarts.clear()  # a new incarnation starts with an empty intensity window

    def _started(self, node: _Node, r: dict[str, Any], at: float) -> None:
        child = self._child(node, r)
        child.state = RUNNING
        child.instance = r.get("instance")
        child.isolation = r.get("isolation") or "thread"
        child.pid = r.get("pid")
        child.restart_count = int(r.get("restart_count") or 0)
        child.stop_reason = None
        child.since = at

    def _crashed(self, node: _Node, r: dict[str, Any], at: float) -> None:
        child = self._child(node, r)
        child.state = RESTARTING
        child.since = at
        child.last_crash = {
            "exc_type": r.get("exc_type"),
            "exc_message": r.get("exc_message"),
            "traceback": r.get("traceback"),
            "at": at,
            "instance": r.get("instance"),
        }

    def _scheduled(self, node: _Node, r: dict[str, Any], at: float) -> None:
        child = self._child(node, r)
        child.state = BACKING_OFF
        child.since = at

    def _restarted(self, node: _Node, r: dict[str, Any], at: float) -> None:
        child = self._child(node, r)
        child.restart_count = int(r.get("restart_count") or child.restart_count)
        child.restarts.append(at)
        self._restart_buckets[_bucket(at)] = self._restart_buckets.get(_bucket(at), 0) + 1
        _trim(self._restart_buckets)

    def _stopped(self, node: _Node, r: dict[str, Any], at: float) -> None:
        child = self._child(node, r)
        if child.instance not in (None, r.get("instance")):
            return  # an older instance's late word: the child already runs again
        child.state = STOPPED
        child.stop_reason = r.get("reason")
        child.since = at

    def _escalated(self, node: _Node, r: dict[str, Any], at: float) -> None:
        sup = self._supervisor(node, str(r.get("supervisor")))
        sup.state = ESCALATED
        sup.escalations += 1
        sup.last_escalation = {"at": at, "reason": r.get("reason"), "parent": r.get("parent")}

    def _poisoned(self, node: _Node, r: dict[str, Any], at: float) -> None:
        node.poisoned += 1

    def _exceeded(self, node: _Node, r: dict[str, Any], at: float) -> None:
        sup = self._supervisor(node, str(r.get("supervisor")))
        sup.intensity = r.get("intensity", sup.intensity)
        sup.period_s = r.get("period_s", sup.period_s)

    # -- output -----------------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        """Everything the page and ``top`` draw (JSON-ready), as of ``now``; the timeline is apart."""
        return {
            "now": now,
            "records": self.records,
            "nodes": [self._node_snapshot(node, now) for node in sorted(self._nodes.values(), key=lambda n: n.name)],
            "chart": self._chart(now),
        }

    def timeline_since(self, seq: int) -> list[dict[str, Any]]:
        """Timeline entries after ``seq`` (0: every one kept)."""
        return [e for e in self.timeline if e["seq"] > seq]

    def _node_snapshot(self, node: _Node, now: float) -> dict[str, Any]:
        status = node.status.status if node.status is not None else None
        rates = self._rates(node)
        actors = []
        for name, figures in sorted((status or {}).get("actors", {}).items()):
            actors.append(
                {
                    "name": name,
                    **figures,
                    "in_per_s": rates.get(f"in/{name}"),
                    "out_per_s": rates.get(f"out/{name}"),
                }
            )
        return {
            "name": node.name,
            "state": node.state,
            "last_event": node.last_event,
            "tree": self._tree(node, now),
            "status_at": node.status.at if node.status is not None else None,
            "node_id": (status or {}).get("node_id"),
            "address": (status or {}).get("address"),
            "actors": actors,
            "transports": (status or {}).get("transports", {}),
            "peers": (status or {}).get("peers", []),
            "outbox": (status or {}).get("outbox"),
            "transfers": (status or {}).get("transfers", []),
            "poisoned": node.poisoned,
        }

    def _tree(self, node: _Node, now: float) -> list[dict[str, Any]]:
        sups = node.supervisors
        roots = [s for s in sups.values() if s.parent is None or s.parent not in sups]
        return [self._sup_row(node, s, now) for s in roots]

    def _sup_row(self, node: _Node, sup: _Supervisor, now: float) -> dict[str, Any]:
        window = sup.period_s if isinstance(sup.period_s, int | float) else None
        children = []
        in_window = 0
        for child in sup.children.values():
            recent = sum(1 for t in child.restarts if window is not None and now - t <= window)
            in_window += recent
            nested = node.supervisors.get(child.child_id)
            row = {
                "id": child.child_id,
                "kind": "supervisor" if nested is not None and nested.parent == sup.supervisor else "worker",
                "state": child.state,
                "instance": child.instance,
                "isolation": child.isolation,
                "pid": child.pid,
                "restart_count": child.restart_count,
                "restarts_in_window": recent,
                "intensity": sup.intensity,
                "period_s": sup.period_s,
                "last_crash": child.last_crash,
                "stop_reason": child.stop_reason,
                "since": child.since,
            }
            if row["kind"] == "supervisor":
                assert nested is not None
                row["supervisor"] = self._sup_row(node, nested, now)
            children.append(row)
        return {
            "id": sup.supervisor,
            "parent": sup.parent,
            "strategy": sup.strategy,
            "intensity": sup.intensity,
            "period_s": sup.period_s,
            "state": sup.state,
            "escalations": sup.escalations,
            "last_escalation": sup.last_escalation,
            "restarts_in_window": in_window,
            "children": children,
        }

    def _rates(self, node: _Node) -> dict[str, float]:
        """Messages per second between the last two status samples, per actor (``in/x``, ``out/x``)."""
        if node.status is None or node.previous is None:
            return {}
        dt = node.status.at - node.previous.at
        if dt <= 0:
            return {}
        now_actors = node.status.status.get("actors", {})
        then_actors = node.previous.status.get("actors", {})
        rates: dict[str, float] = {}
        total = 0.0
        for name, figures in now_actors.items():
            before = then_actors.get(name, {})
            for key in ("in", "out"):
                delta = max(0, int(figures.get(key, 0)) - int(before.get(key, 0)))
                rates[f"{key}/{name}"] = delta / dt
                if key == "in":
                    total += delta / dt
        rates["_total_in"] = total
        return rates

    def _chart(self, now: float) -> dict[str, Any]:
        last = _bucket(now)
        first = last - CHART_BUCKETS + 1
        return {
            "bucket_s": BUCKET_S,
            "start": first * BUCKET_S,
            "restarts": [self._restart_buckets.get(b, 0) for b in range(first, last + 1)],
            "msg_rate": [self._rate_buckets.get(b) for b in range(first, last + 1)],
        }


def _node_state(state: str) -> Any:
    def apply(view: MeshView, node: _Node, r: dict[str, Any], at: float) -> None:
        node.state = state

    return apply


_HANDLERS: dict[str, Any] = {
    "supervisor_started": MeshView._supervisor_started,
    "child_started": MeshView._started,
    "child_crashed": MeshView._crashed,
    "child_restart_scheduled": MeshView._scheduled,
    "child_restarted": MeshView._restarted,
    "child_stopped": MeshView._stopped,
    "supervisor_escalated": MeshView._escalated,
    "restart_intensity_exceeded": MeshView._exceeded,
    "message_poisoned": MeshView._poisoned,
    "node_starting": _node_state("starting"),
    "node_started": _node_state("running"),
    "node_stopped": _node_state("stopped"),
    "node_failed": _node_state("failed"),
}


def _bucket(at: float) -> int:
    return int(at // BUCKET_S)


def _trim(buckets: dict[int, Any]) -> None:
    if len(buckets) > CHART_BUCKETS * 2:
        for key in sorted(buckets)[: len(buckets) - CHART_BUCKETS]:
            del buckets[key]
