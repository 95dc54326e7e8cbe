"""The harness itself: a lab is removed however it ends, leftovers of dead runs go, faults do what they say."""

from __future__ import annotations

import subprocess

import pytest

from tests.lab.conftest import MakeCluster
from villagemesh.errors import LabError
from villagemesh.lab import NetLab, cleanup_leftovers
from villagemesh.lab.netns import NETNS_DIR

pytestmark = pytest.mark.slow


def namespaces(prefix: str) -> list[str]:
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix)) if NETNS_DIR.is_dir() else []


def dead_pid() -> int:
    """A process id that no process has right now (a child that exited and was reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_lab_is_removed_even_when_the_block_fails(netns_available: None) -> None:
    lab = NetLab(3)
    with pytest.raises(RuntimeError), lab:
        assert len(namespaces(lab.prefix)) == 4  # three hosts and the switch
        raise RuntimeError("the test failed")
    assert namespaces(lab.prefix) == []


def test_the_namespaces_of_a_killed_run_are_removed_by_the_next_lab_and_no_others(netns_available: None) -> None:
    stale = f"vl{dead_pid():x}x0-ns1"
    alive = NetLab(1)
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with alive:
            assert stale not in namespaces("vl")  # the start of a lab removed it
            assert cleanup_leftovers() == []  # our own, alive, lab is left alone
            assert namespaces(alive.prefix) == [alive.ns(1), alive.sw]
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


def test_bad_partitions_are_refused_naming_them(netns_available: None) -> None:
    with NetLab(3) as lab:
        with pytest.raises(LabError, match=r"\[\[1, 2\], \[2, 3\]\]"):
            lab.partition([1, 2], [2, 3])
        with pytest.raises(LabError, match="netem"):
            lab.set_link(1, 2, delay=0.01)


def test_delay_and_loss_on_the_tap_switch_still_deliver_exactly_once(make_cluster: MakeCluster) -> None:
    """Every link 10 ms +- 5 ms each way, 5 % of frames lost: 300 messages, each handled once, in order;
    then a partition on the switch holds host 1's next messages back until it heals."""
    lab = make_cluster(3, lan=True, bootstrap="first", switch="tap", seed=25)
    lab.wait_converged(timeout=30)
    for a, b in ((1, 2), (1, 3), (2, 3)):
        lab.net.set_link(a, b, delay=0.010, jitter=0.005, loss=0.05)
    lab[1].send(lab[2].node_id, 100)
    lab[3].send(lab[2].node_id, 100)
    lab[2].send(lab[1].node_id, 100)
    lab.wait_delivered(timeout=60)
    lab.check_exactly_once()
    assert lab.net.tap.stats["lost"] > 0
    handled = len(lab[2].lines("received"))
    lab.partition([1], [2, 3])
    lab[1].send(lab[2].node_id, 10)
    lab.wait_until(lambda: lab.net.tap.stats["cut"] > 0, timeout=30, what="frames dropped by the partition")
    assert len(lab[2].lines("received")) == handled
    lab.heal()
    lab.wait_delivered(timeout=60)
    lab.check_exactly_once()
