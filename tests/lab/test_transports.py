"""A host whose transport actors are crashed again and again keeps delivering over the other transports.

Every transport that exists today: WebSocket, and BetaNet (hybrid mode with ``betanet=True``: five
hosts, every one a mixnode, so a route of three mixes exists). The hybrid order tries BetaNet
first and fails over to WebSocket; host 1 sends steadily while its BetaNet relay is crashed
four times, then its WebSocket actor four times (spaced so the transports supervisor's
restart intensity, 10 in 10 s, is never reached: each crash is one restart, not an escalation).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any

import pytest

from tests.lab.conftest import MakeCluster
from villagemesh.lab import Cluster

pytestmark = pytest.mark.slow

CRASHES = 4
GAP = 0.8
"""Seconds between two crashes of one transport."""
BATCH = 10


def when(event: dict[str, Any]) -> float:
    """An event's wall time (its ISO 8601 UTC timestamp)."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def crash_storm(lab: Cluster, actor: str) -> tuple[int, float, float]:
    """Crash ``actor`` on host 1 :data:`CRASHES` times (each seen in its log before the next) while host 1
    sends; the messages handled at host 2 meanwhile, and the storm's start and end (wall time)."""
    receiver = lab[2]
    start = time.time()
    before = len(receiver.lines("received"))
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            lab[1].send(receiver.node_id, BATCH)
            stop.wait(0.1)

    sender = threading.Thread(target=load, name=f"load-{actor}")
    sender.start()
    try:
        for _ in range(CRASHES):
            time.sleep(GAP)
            lab[1].crash(actor)
        time.sleep(GAP)
    finally:
        stop.set()
        sender.join(30)
    return len(receiver.lines("received")) - before, start, time.time()


def test_a_host_whose_transports_crash_repeatedly_keeps_delivering_over_the_others(make_cluster: MakeCluster) -> None:
    lab = make_cluster(5, lan=True, bootstrap="first", betanet=True, ack_timeout=5.0)
    lab.wait_converged(timeout=30)
    lab.wait_until(lambda: all(h.status()["betanet"]["mixnodes"] >= 4 for h in lab), timeout=30, what="every mix known")
    storms = {actor: crash_storm(lab, actor) for actor in ("betanet", "websocket")}
    lab.wait_delivered(timeout=60)
    lab.check_exactly_once()

    assert all(handled > 0 for handled, _, _ in storms.values())
    events = lab[1].events()
    crashed = [e["child_id"] for e in events if e["event"] == "child_crashed"]
    restarted = [e["child_id"] for e in events if e["event"] == "child_restarted"]
    assert crashed.count("betanet") == crashed.count("websocket") == CRASHES
    assert restarted.count("betanet") == restarted.count("websocket") == CRASHES
    assert not [e for e in events if e["event"] in ("restart_intensity_exceeded", "supervisor_escalated")]
    # While one transport was being crashed again and again, messages went out over the other.
    for crashed_one, other in (("betanet", "websocket"), ("websocket", "betanet")):
        _, start, end = storms[crashed_one]
        carried = [
            e
            for e in events
            if e["event"] == "messages_delivered" and other in e["transports"] and start <= when(e) <= end
        ]
        assert carried, f"nothing went over {other} while {crashed_one} was crashed again and again"
