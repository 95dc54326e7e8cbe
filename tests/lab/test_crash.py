"""A host crashes with 1,000 messages in flight and reboots on its data dir: nothing lost, nothing handled twice.

The receiver's application spends a little time on each message, so the crash lands mid-stream:
some messages handled, one maybe in its handler, the rest stored at the sender or in the
receiver's inbox. The receiving host loses power (cable out, ``kill -9``, its namespace and
kernel socket state gone, booted again with the same address and MAC); the sending host's node
process is ``kill -9``-ed and started again.
"""

from __future__ import annotations

import pytest

from tests.lab.conftest import MakeCluster

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
