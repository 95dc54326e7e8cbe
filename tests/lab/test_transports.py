"""A host whose transport actors are crashed again and again keeps delivering over the other transports.

Every transport a lab host has: libp2p, BetaNet and WebSocket (hybrid mode with ``betanet=True``:
five hosts, every one a mixnode, so a route of three mixes exists; BitChat needs a radio, and the
lab's hosts have none). The hybrid order tries libp2p, then BetaNet, then WebSocket; host 1 sends
steadily while each of its transport actors in turn is crashed four times (spaced so the
transports supervisor's restart intensity, 10 in 10 s, is never reached: each crash is one
restart, not an escalation), and during each storm the others carry its messages.
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
PAUSE = 3.0
"""Seconds between two storms: three storms of four crashes back to back would put 11 in 10 s."""
BATCH = 10
BURST = 100
"""Messages sent just before each crash."""
TRANSPORTS = ("libp2p", "betanet", "websocket")


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
            lab[1].send(receiver.node_id, BURST)  # in flight when the crash comes: they must go another way
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
    storms = {}
    for actor in TRANSPORTS:
        storms[actor] = crash_storm(lab, actor)
        time.sleep(PAUSE)
    lab.wait_delivered(timeout=60)
    lab.check_exactly_once()

    assert all(handled > 0 for handled, _, _ in storms.values())
    events = lab[1].events()
    crashed = [e["child_id"] for e in events if e["event"] == "child_crashed"]
    restarted = [e["child_id"] for e in events if e["event"] == "child_restarted"]
    assert [crashed.count(t) for t in TRANSPORTS] == [CRASHES] * len(TRANSPORTS)
    assert [restarted.count(t) for t in TRANSPORTS] == [CRASHES] * len(TRANSPORTS)
    assert not [e for e in events if e["event"] in ("restart_intensity_exceeded", "supervisor_escalated")]
    # While one transport was being crashed again and again, messages went out over the others.
    for crashed_one in TRANSPORTS:
        _, start, end = storms[crashed_one]
        carried = [
            e
            for e in events
            if e["event"] == "messages_delivered"
            and set(e["transports"]) - {crashed_one}
            and start <= when(e) <= end
        ]
        assert carried, f"nothing went over another transport while {crashed_one} was crashed again and again"
