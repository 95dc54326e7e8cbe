"""Whole nodes in the anonymous mode: messages cross three mixes, acks come back by SURB, nothing is lost.

Five nodes on 127.0.0.1, each a mixnode (the anonymous mode runs the BetaNet relay), seeded in a
chain and finding the rest by peer exchange; the registry gives each relay the others' mix keys.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration._nodes import PATIENCE, EventFile, Inbox, free_port, make_node, running, wait_until
from tests.integration.test_network import Child, knows, retrier_idle

pytestmark = pytest.mark.slow


@pytest.fixture
def processes() -> Iterator[list[Child]]:
    """Node processes started by a test, stopped after it however it ends."""
    started: list[Child] = []
    yield started
    for child in started:
        child.terminate()


def five(tmp_path: Path, *, special: dict[str, Any] | None = None, **settings: Any) -> list[Any]:
    """Five anonymous-mode nodes seeded in a ring; ``special`` settings go to n2 alone."""
    ports = [free_port() for _ in range(5)]
    return [
        make_node(
            tmp_path / f"n{i}",
            f"n{i}",
            mode="anonymous",
            port=ports[i],
            bootstrap=[f"127.0.0.1:{ports[(i + 1) % 5]}"],
            **{**settings, **(special or {} if i == 2 else {})},
        )
        for i in range(5)
    ]


def mixes_ready(nodes: list[Any]) -> bool:
    return all(knows(n, {m.node_id for m in nodes} - {n.node_id}) for n in nodes) and all(
        n.network_status()["betanet"]["mixnodes"] >= 4 for n in nodes
    )


def test_anonymous_messages_cross_three_mixes_and_are_handled_exactly_once(tmp_path: Path) -> None:
    """60 messages n0 → n4 by betanet (not websocket): each handled once, every handle delivered by an ack on a SURB.

    The ack timeout is 20 s here: with the node default of this suite (1 s), or even 5 s, a round trip of twelve
    Python hops on a loaded 2-core machine may miss it, and the retrier then (rightly) fails over to websocket,
    which this test is not about (test_a_relay_crashed... and the kill tests cover failing over). Each message's outcome
    report rides the request's second SURB; the handle may end on it before the ack comes, so the counts are
    read once every ack is in.
    """
    nodes = five(tmp_path, ack_timeout=20.0)
    inbox = Inbox()
    nodes[4].subscribe("*", inbox)
    with running(nodes):
        assert wait_until(lambda: mixes_ready(nodes)), "the nodes never learnt each other's mix keys"
        handles = [nodes[0].send(nodes[4].node_id, f"a{i}".encode()) for i in range(60)]
        assert inbox.wait_for_distinct(60), f"only {len(inbox.distinct())} of 60 arrived"
        assert all(h.result(PATIENCE).delivered for h in handles)
        # A handle ends on the recipient's outcome report, which may overtake the ack (each
        # waits out its own mixing delays): wait for every ack too, then count.
        assert wait_until(lambda: retrier_idle(nodes[0]) and retrier_idle(nodes[4])), "acks still outstanding"
        assert inbox.duplicates() == {} and set(inbox.senders.values()) == {nodes[0].node_id}
        receiver = nodes[4].network_status()["betanet"]["counts"]
        sender = nodes[0].network_status()["betanet"]["counts"]
        assert receiver.get("received", 0) >= 60 and receiver.get("sent.acks_on_surbs", 0) >= 60, receiver
        assert sender.get("sent.messages", 0) >= 60 and sender.get("received", 0) >= 60, sender
        relayed = sum(n.network_status()["betanet"]["counts"].get("packets.unwrapped", 0) for n in nodes[1:4])
        assert relayed >= 60 * 3, f"the three middle nodes unwrapped only {relayed} packets"


def test_a_relay_crashed_mid_stream_restarts_alone_and_nothing_is_lost(tmp_path: Path) -> None:
    """The betanet actor of a mix node crashed while 100 messages are in flight: each still arrives once."""
    nodes = five(tmp_path, ack_timeout=1.0)
    inbox = Inbox()
    nodes[4].subscribe("*", inbox)
    with running(nodes):
        assert wait_until(lambda: mixes_ready(nodes))
        handles = [nodes[0].send(nodes[4].node_id, f"c{i}".encode()) for i in range(50)]
        nodes[2].crash("betanet")
        handles += [nodes[0].send(nodes[4].node_id, f"c{i}".encode()) for i in range(50, 100)]
        assert inbox.wait_for_distinct(100), f"only {len(inbox.distinct())} of 100 arrived"
        assert all(h.result(PATIENCE).delivered for h in handles)
        assert inbox.duplicates() == {}
    log = EventFile(nodes[2].log_path)
    assert log.matching("child_crashed", child_id="betanet") and log.matching("child_restarted", child_id="betanet")
    others = [e["child_id"] for e in log.matching("child_restarted") if e["child_id"] != "betanet"]
    assert others == [], f"actors other than betanet restarted: {others}"


def test_kill_9_of_a_process_isolated_relay_mid_stream_restarts_it_alone_and_loses_nothing(tmp_path: Path) -> None:
    """n2's relay runs in its own process (connections reach it by SCM_RIGHTS); SIGKILLed mid-stream, it is back."""
    nodes = five(tmp_path, special={"betanet_isolation": "process"})
    inbox = Inbox()
    nodes[4].subscribe("*", inbox)
    with running(nodes):
        assert wait_until(lambda: mixes_ready(nodes))
        log = EventFile(nodes[2].log_path)
        [started] = log.wait_for("child_started", child_id="betanet")
        assert started["isolation"] == "process"
        handles = [nodes[0].send(nodes[4].node_id, f"p{i}".encode()) for i in range(100)]
        assert wait_until(lambda: len(inbox.distinct()) >= 10)
        os.kill(int(started["pid"]), signal.SIGKILL)
        handles += [nodes[0].send(nodes[4].node_id, f"p{i}".encode()) for i in range(100, 200)]
        assert inbox.wait_for_distinct(200, timeout=90), f"only {len(inbox.distinct())} of 200 arrived"
        assert all(h.result(PATIENCE).delivered for h in handles)
        assert inbox.duplicates() == {}
        restarted = log.wait_for("child_started", count=2, child_id="betanet")[-1]
        assert restarted["pid"] != started["pid"]
        assert wait_until(lambda: nodes[2].network_status()["betanet"]["counts"].get("packets.unwrapped", 0) > 0)
    crashed = log.matching("child_crashed", child_id="betanet")
    kinds = [(e["exc_type"], e["exc_message"]) for e in crashed]
    assert any(kind == "ChildProcessDied" and "SIGKILL" in text for kind, text in kinds), kinds
    others = [e["child_id"] for e in log.matching("child_restarted") if e["child_id"] != "betanet"]
    assert others == [], f"actors other than betanet restarted: {others}"


def test_kill_9_of_a_mix_node_process_mid_stream_loses_nothing(tmp_path: Path, processes: list[Child]) -> None:
    """One of the five is a separate process, SIGKILLed while 200 messages cross the mixes, then restarted."""
    nodes = five(tmp_path)
    mix = nodes.pop(2)  # its place is taken by a process with the same data dir and port
    args = ["--data-dir", str(tmp_path / "n2"), "--name", "n2", "--port", str(mix.port), "--mode", "anonymous"]
    args += ["--bootstrap", f"127.0.0.1:{nodes[2].port}"]
    inbox = Inbox()
    nodes[3].subscribe("*", inbox)
    with running(nodes):
        processes.append(Child(*args))
        mix_id = processes[-1].wait_line("LISTEN").split()[1]
        everyone = {n.node_id for n in nodes} | {mix_id}
        assert wait_until(lambda: all(knows(n, everyone - {n.node_id}) for n in nodes))
        handles = [nodes[0].send(nodes[3].node_id, f"k{i}".encode()) for i in range(100)]
        assert wait_until(lambda: len(inbox.distinct()) >= 20)
        processes[-1].kill()
        handles += [nodes[0].send(nodes[3].node_id, f"k{i}".encode()) for i in range(100, 200)]
        processes.append(Child(*args))
        assert processes[-1].wait_line("LISTEN").split()[1] == mix_id
        assert inbox.wait_for_distinct(200, timeout=90), f"only {len(inbox.distinct())} of 200 arrived"
        assert all(h.result(PATIENCE).delivered for h in handles)
        assert inbox.duplicates() == {}
        assert wait_until(lambda: retrier_idle(nodes[0]))


def test_a_request_and_its_reply_travel_anonymously_the_reply_on_the_requests_surb(tmp_path: Path) -> None:
    """n0.request(n4): the request crosses three mixes with two SURBs; the ack rides one, the reply the other."""
    nodes = five(tmp_path, ack_timeout=5.0)
    nodes[4].subscribe("*", lambda message: b"pong to " + message.payload)
    with running(nodes):
        assert wait_until(lambda: mixes_ready(nodes))
        assert nodes[0].request(nodes[4].node_id, b"ping", timeout=30.0) == b"pong to ping"
        counts = nodes[4].network_status()["betanet"]["counts"]
        assert counts.get("sent.acks_on_surbs") == 1 and counts.get("sent.replies_on_surbs") == 1, counts
        assert counts.get("sent.messages", 0) == 0, f"the responder built a route of its own: {counts}"
