"""Ten hosts find each other: by LAN multicast alone, and through one bootstrap peer and peer exchange."""

from __future__ import annotations

import time

import pytest

from tests.lab.conftest import MakeCluster
from villagemesh.lab import Cluster

pytestmark = pytest.mark.slow

BEACON_PORT = 42424


def beacon_sources(lab: Cluster, i: int) -> set[str]:
    """The addresses whose multicast beacons host ``i`` verified (its ``peer_discovered`` from the beacon port)."""
    sources = {e.get("source", "") for e in lab[i].events() if e["event"] == "peer_discovered"}
    return {s.rsplit(":", 1)[0] for s in sources if s.endswith(f":{BEACON_PORT}")}


def test_ten_hosts_find_each_other_by_lan_multicast_alone(make_cluster: MakeCluster) -> None:
    """No node is told any address: all that seeds discovery is the signed multicast beacons.

    Every host's beacons are heard, and every host hears others' beacons. A peer first learned
    through a neighbour's exchange (with a beacon's signed announce, passed on) is not verified
    again when its own beacon comes, so a host need not log a discovery from a beacon of each of
    the nine, nor of any: one that learned all of them from exchanges before their beacons came
    logs none (seen once, in a clean clone's `make test` under coverage). So that a host hears
    beacons is read from its beacon endpoint's count of those it verified, not from its log.
    """
    lab = make_cluster(10, lan=True, bootstrap="none")
    lab.wait_converged(timeout=30)
    heard = {i: beacon_sources(lab, i) for i in lab.hosts}
    assert set().union(*heard.values()) == {lab.net.addr(i) for i in lab.hosts}, heard
    deadline = time.monotonic() + 30
    while (deaf := [i for i in lab.hosts if not lab[i].lan_counters()["beacon"].get("accepted")]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)  # (the next beacons are seconds away at most)
    assert not deaf, {i: lab[i].lan_counters()["beacon"] for i in deaf}


def test_ten_hosts_find_each_other_through_one_bootstrap_peer_and_peer_exchange(make_cluster: MakeCluster) -> None:
    """No multicast; hosts 2-10 know only host 1's address, host 1 knows none: peer exchange spreads the rest."""
    lab = make_cluster(10, lan=False, bootstrap="first")
    lab.wait_converged(timeout=30)
    assert all(not beacon_sources(lab, i) for i in lab.hosts)


@pytest.mark.parametrize(("lan", "bootstrap"), [(True, "none"), (False, "first")], ids=["multicast", "seed"])
def test_hosts_whose_cables_are_plugged_in_together_hear_the_network_come_up_and_find_each_other(
    make_cluster: MakeCluster, lan: bool, bootstrap: str
) -> None:
    """Every cable out while the nodes start, then all plugged in at once: each node's link watch
    (rtnetlink) logs ``network_up``; its beacon starts over and it exchanges with its seeds at once."""
    lab = make_cluster(5, start=False, lan=lan, bootstrap=bootstrap)
    lab.cut(*lab.hosts)
    lab.start(lab.hosts)
    lab.restore(*lab.hosts)
    lab.wait_converged(timeout=30)
    for i in lab.hosts:
        ups = [e for e in lab[i].events() if e["event"] == "network_up"]
        assert ups and ups[0]["why"] == "interface running", (i, ups)
        counters = lab[i].lan_counters()
        if lan:  # every peer heard is a newcomer, but each node is in its own fast start: no answers
            beacon = counters["beacon"]
            assert beacon["network_up"] >= 1 and beacon["accepted"] >= 1, (i, counters)
            assert not beacon.get("answers"), (i, counters)
        else:
            assert not counters["beacon"], (i, counters)  # no beacons at all
