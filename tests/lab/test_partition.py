"""A 3 | 7 partition, messages across it, then the heal: each one handled exactly once, in per-sender order."""

from __future__ import annotations

import pytest

from tests.lab.conftest import MakeCluster

pytestmark = pytest.mark.slow

PER_STREAM = 20
"""Messages each host sends to each host on the other side (and to one on its own side)."""


def test_messages_sent_across_a_3_7_partition_arrive_exactly_once_in_order_after_healing(
    make_cluster: MakeCluster,
) -> None:
    lab = make_cluster(10, lan=True, bootstrap="first")
    lab.wait_converged(timeout=30)
    left, right = [1, 2, 3], [4, 5, 6, 7, 8, 9, 10]
    lab.partition(left, right)
    for a, b in [(a, b) for a in left for b in right] + [(b, a) for a in left for b in right]:
        lab[a].send(lab[b].node_id, PER_STREAM)
    lab[1].send(lab[2].node_id, PER_STREAM)  # on one side: goes through during the partition
    lab[4].send(lab[10].node_id, PER_STREAM)
    lab.wait_until(
        lambda: len(lab[2].lines("received")) >= PER_STREAM and len(lab[10].lines("received")) >= PER_STREAM,
        timeout=30,
        what="delivery within each side",
    )
    side = {i: left if i in left else right for i in lab.hosts}
    crossed = [(p, i) for i in lab.hosts for p in lab[i].lines("received") if int(p[1 : p.index(":")]) not in side[i]]
    assert crossed == [], "messages crossed the partition"
    assert all(len(lab[i].lines("sent")) > 0 for i in lab.hosts)

    lab.heal()
    lab.wait_delivered(timeout=60)
    lab.check_exactly_once()
    expected = {i: 3 * PER_STREAM if i in right else 7 * PER_STREAM for i in lab.hosts}
    expected[2] += PER_STREAM
    expected[10] += PER_STREAM
    assert {i: len(lab[i].lines("received")) for i in lab.hosts} == expected
