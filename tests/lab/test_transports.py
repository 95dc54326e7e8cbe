"""A host whose transport actors are crashed again and again keeps delivering over the other transports.

Every transport a lab host has: libp2p, BitChat, BetaNet and WebSocket (hybrid mode with
``betanet=True``: five hosts, every one a mixnode, so a route of three mixes exists; and
``bitchat=True``: every host has a radio on the lab's air, :mod:`villagemesh.lab.air`). The hybrid
order tries libp2p, then BitChat, then BetaNet, then WebSocket; host 1 sends steadily while each of
its transport actors in turn is crashed four times (spaced so the transports supervisor's restart
intensity, 10 in 10 s, is never reached: each crash is one restart, not an escalation), and during
each storm the others carry its messages. And a host whose cable is cut keeps delivering over its
radio: BitChat does not need the LAN.
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
TRANSPORTS = ("libp2p", "bitchat", "betanet", "websocket")


def when(event: dict[str, Any]) -> float:
    """An event's wall time (its ISO 8601 UTC timestamp)."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def radio_peers(host: Any) -> int:
    """How many BitChat peers ``host`` has verified (their signed announces came over the air)."""
    return len(host.status()["bitchat"]["peers"])


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
    lab = make_cluster(5, lan=True, bootstrap="first", betanet=True, bitchat=True, ack_timeout=5.0)
    lab.wait_converged(timeout=30)
    lab.wait_until(lambda: all(h.status()["betanet"]["mixnodes"] >= 4 for h in lab), timeout=30, what="every mix known")
    lab.wait_until(lambda: radio_peers(lab[1]) >= 4, timeout=30, what="host 1's radio neighbours verified")
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


def test_a_host_whose_cable_is_cut_keeps_delivering_over_its_radio(make_cluster: MakeCluster) -> None:
    """Host 1's cable out: libp2p and WebSocket cannot reach host 2, BitChat over the air can. Every
    message sent while the cable is out is handled before it goes back in, and went over BitChat;
    jamming the radio too leaves them stored until the cable is back."""
    lab = make_cluster(3, lan=True, bootstrap="first", bitchat=True, ack_timeout=2.0)
    lab.wait_converged(timeout=30)
    lab.wait_until(lambda: radio_peers(lab[1]) >= 2, timeout=30, what="host 1's radio neighbours verified")
    sender, receiver = lab[1], lab[2]
    lab.cut(1)
    cut_at = time.time()
    for _ in range(5):
        sender.send(receiver.node_id, BATCH)
    lab.wait_delivered(timeout=60)
    assert len(receiver.lines("received")) == 5 * BATCH
    carried = [e for e in sender.events() if e["event"] == "messages_delivered" and when(e) >= cut_at]
    assert carried and all(set(e["transports"]) == {"bitchat"} for e in carried), carried
    lab.jam(1)
    sender.send(receiver.node_id, BATCH)
    time.sleep(3.0)  # some attempts on every transport, none reaching host 2
    assert len(receiver.lines("received")) == 5 * BATCH
    lab.restore(1)
    lab.wait_delivered(timeout=60)
    lab.check_exactly_once()
    assert len(receiver.lines("received")) == 6 * BATCH
