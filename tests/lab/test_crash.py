"""A host crashes with 1,000 messages in flight and reboots on its data dir: nothing lost, nothing handled twice.

The receiver's application spends a little time on each message, so the crash lands mid-stream:
some messages handled, one maybe in its handler, the rest stored at the sender or in the
receiver's inbox. The receiving host loses power (cable out, ``kill -9``, its namespace and
kernel socket state gone, booted again with the same address and MAC); the sending host's node
process is ``kill -9``-ed and started again.
"""

from __future__ import annotations

import threading

import pytest

from tests.lab.conftest import MakeCluster
from villagemesh.errors import LabError

pytestmark = pytest.mark.slow

COUNT = 1000
WORK = 0.002
"""Seconds of application work per message: 1,000 take two seconds or more to handle."""


def test_a_receiving_host_that_loses_power_with_1000_in_flight_handles_each_once_after_reboot(
    make_cluster: MakeCluster,
) -> None:
    lab = make_cluster(3, lan=True, bootstrap="first", work=WORK)
    lab.wait_converged(timeout=30)
    receiver = lab[2]
    lab[1].send(receiver.node_id, COUNT)
    lab[3].send(receiver.node_id, COUNT // 10)
    lab.wait_until(lambda: len(receiver.lines("received")) >= 100, timeout=30, what="the first 100 handled")
    lab.power_cycle(2)
    at_crash = len(receiver.lines("received"))
    assert at_crash < COUNT, "everything was handled before the crash: nothing was in flight"
    lab.wait_delivered(timeout=60)
    lab.check_exactly_once()
    assert len(receiver.lines("received")) == COUNT + COUNT // 10
    assert receiver.boots == 2


def test_a_sending_host_killed_with_1000_in_flight_resends_each_once_after_restart(make_cluster: MakeCluster) -> None:
    lab = make_cluster(3, lan=True, bootstrap="first", work=WORK)
    lab.wait_converged(timeout=30)
    sender, receiver = lab[1], lab[2]
    sender.send(receiver.node_id, COUNT)
    lab.wait_until(lambda: len(receiver.lines("received")) >= 100, timeout=30, what="the first 100 handled")
    lab.kill9(1)
    assert len(receiver.lines("received")) < COUNT, "everything was handled before the kill: nothing was in flight"
    assert lab.boot(1) == sender.node_id
    lab.wait_delivered(timeout=60)
    lab.check_exactly_once()
    assert len(receiver.lines("received")) == COUNT


def test_a_sending_host_killed_in_the_middle_of_a_send_sends_the_batch_again_and_each_arrives_once(
    make_cluster: MakeCluster,
) -> None:
    """The kill lands while ``send_many`` is storing a big batch (its intent written, its ``sent`` line not):
    nobody knows which of its chunks were stored, so the booted agent sends the batch again with the same
    message ids; the chunks stored the first time are not stored or handled twice. (The copy of a message
    handled already is dropped by the receiver; its new handle ends UNCONFIRMED after ``outcome_timeout``
    and holds its room in the send window until then, hence 2 s here: the window is 1,000 a peer.)"""
    lab = make_cluster(2, lan=True, bootstrap="first", outcome_timeout=2.0)
    lab.wait_converged(timeout=30)
    sender, receiver = lab[1], lab[2]
    failed: list[Exception] = []

    def send() -> None:
        try:
            sender.send(receiver.node_id, 20 * COUNT, timeout=60)
        except LabError as exc:
            failed.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    lab.wait_until(lambda: bool(sender.lines("intent")), timeout=30, what="the batch's intent")
    # Some of it stored and handled, not all (the send window, 1,000 a peer, keeps the batch's send going):
    lab.wait_until(lambda: len(receiver.lines("received")) >= 100, timeout=30, what="the first 100 handled")
    assert not sender.lines("sent"), "the whole batch was stored before the kill: no send was cut short"
    lab.kill9(1)
    assert receiver.lines("received"), "nothing was stored before the kill: no copy is sent again"
    thread.join(30)
    assert failed, "the send command was answered although its node was killed"
    assert lab.unsent() == {sender.name: [f"{receiver.node_id} 0 {20 * COUNT - 1}"]}
    assert lab.boot(1) == sender.node_id
    lab.wait_until(lambda: not lab.unsent(), timeout=60, what="the cut-short batch sent again")
    assert sender.lines("resent") == [f"{receiver.node_id} 0 {20 * COUNT - 1}"]
    lab.wait_delivered(timeout=90)
    lab.check_exactly_once()
    assert len(receiver.lines("received")) == 20 * COUNT
