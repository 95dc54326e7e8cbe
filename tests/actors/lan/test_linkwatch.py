"""The network coming up: rtnetlink messages parsed, ups told apart from noise, a beacon sent at once."""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from typing import Any

import structlog
from hypothesis import given
from hypothesis import strategies as st

from tests.actors.acceptor.support import free_udp_port, run, until
from tests.actors.lan.test_beacon import Heard, identity, loopback
from villagemesh.actors.lan.beacon import BeaconEndpoint
from villagemesh.actors.lan.linkwatch import (
    IFF_RUNNING,
    RTM_NEWADDR,
    RTM_NEWLINK,
    LinkEvent,
    LinkState,
    LinkWatch,
    parse_events,
)
from villagemesh.actors.lan.state import BeaconSchedule


def link(index: int, running: bool) -> bytes:
    """An RTM_NEWLINK message as the kernel writes it (no attributes)."""
    body = struct.pack("=BxHiII", 0, 1, index, 0x1003 | (IFF_RUNNING if running else 0), 0)
    return struct.pack("=IHHII", 16 + len(body), RTM_NEWLINK, 0, 0, 0) + body


def address(index: int, family: int = 2) -> bytes:
    """An RTM_NEWADDR message (family 2: IPv4), padded to 4 bytes as netlink aligns."""
    body = struct.pack("=BBBBi", family, 16, 0, 0, index)
    return struct.pack("=IHHII", 16 + len(body), RTM_NEWADDR, 0, 0, 0) + body


def test_link_and_ipv4_address_messages_are_parsed_and_the_rest_skipped() -> None:
    other = struct.pack("=IHHII", 20, 24, 0, 0, 0) + b"\x00" * 4  # RTM_NEWROUTE: not ours
    data = link(2, False) + other + link(2, True) + address(3) + address(3, family=10)
    assert parse_events(data) == [
        LinkEvent(2, "link", False),
        LinkEvent(2, "link", True),
        LinkEvent(3, "address", True),
    ]


def test_a_truncated_or_lying_message_is_counted_not_raised() -> None:
    counts: Counter[str] = Counter()
    short = struct.pack("=IHHII", 18, RTM_NEWLINK, 0, 0, 0) + b"\x00\x00"  # too short for an ifinfomsg
    assert parse_events(short, counts) == [] and counts["malformed"] == 1
    lying = struct.pack("=IHHII", 4096, RTM_NEWLINK, 0, 0, 0)  # claims more than the datagram has
    assert parse_events(link(1, True) + lying, counts) == [LinkEvent(1, "link", True)]
    assert counts["malformed"] == 2


@given(st.binary(max_size=256))
def test_any_bytes_parse_to_events_without_raising(data: bytes) -> None:
    assert all(isinstance(e, LinkEvent) for e in parse_events(data, Counter()))


def test_an_interface_coming_up_is_an_up_once_and_noise_is_not() -> None:
    state = LinkState(min_gap_s=1.0)
    assert not state.observe(LinkEvent(2, "link", False), now=0.0)  # cable out
    assert state.observe(LinkEvent(2, "link", True), now=5.0)  # plugged in
    assert not state.observe(LinkEvent(2, "link", True), now=5.2)  # another attribute changed: still up
    assert not state.observe(LinkEvent(2, "link", False), now=5.4)
    assert not state.observe(LinkEvent(2, "link", True), now=5.6)  # a flap within min_gap_s: one fast start
    assert not state.observe(LinkEvent(2, "link", False), now=9.0)
    assert state.observe(LinkEvent(2, "link", True), now=9.5)  # out and in again, later: an up
    assert state.observe(LinkEvent(3, "link", True), now=20.0)  # first seen running: up
    assert state.observe(LinkEvent(3, "address", True), now=30.0)  # DHCP gave an address


def test_the_watch_tells_each_up_and_logs_it() -> None:
    ups: list[str] = []
    now = [100.0]
    with structlog.testing.capture_logs() as logs:
        watch = LinkWatch(ups.append, log=structlog.get_logger(), clock=lambda: now[0])
        watch.feed(link(4, False))
        watch.feed(link(4, True))
        now[0] += 5
        watch.feed(address(4))
    assert ups == ["interface running", "IPv4 address added"]
    assert [e["interface"] for e in logs if e["event"] == "network_up"] == [4, 4]
    assert watch.counts["events"] == 3 and watch.counts["ups"] == 2


def test_the_watch_opens_rtnetlink_here_and_closes_it() -> None:
    async def body() -> bool:
        watch = LinkWatch(lambda why: None, log=structlog.get_logger())
        watch.start()
        available = watch.available
        watch.close()
        return available

    with structlog.testing.capture_logs() as logs:
        available = run(body())
    assert available or [e for e in logs if e["event"] == "linkwatch_unavailable"]


def test_the_network_coming_up_sends_a_beacon_at_once_and_starts_the_fast_start_again() -> None:
    """With a 30 s schedule, the next beacon after the first is 30 s away; network_up sends one now."""
    slow = BeaconSchedule(interval_s=30.0, first_s=30.0, jitter=0.0)

    async def body() -> dict[str, Any]:
        endpoint = BeaconEndpoint(identity(), Heard(), loopback(free_udp_port(), schedule=slow))
        await endpoint.start()
        await until(lambda: endpoint.counts["sent"] == 1)
        endpoint.network_up("test")
        await until(lambda: endpoint.counts["sent"] >= 2)
        counts = dict(endpoint.counts)
        await endpoint.close()
        return counts

    counts = run(body())
    assert counts["network_up"] == 1 and counts["sent"] >= 2


def test_a_closed_endpoint_ignores_the_network_coming_up() -> None:
    async def body() -> None:
        endpoint = BeaconEndpoint(identity(), Heard(), loopback(free_udp_port()))
        await endpoint.start()
        await endpoint.close()
        endpoint.network_up("late")
        await asyncio.sleep(0)

    run(body())
