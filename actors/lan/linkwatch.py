"""Hearing the network appear: Linux rtnetlink link and address events, so a node beacons at once.

A node's beacons go out every ``interval_s`` (2 s). When a cable is plugged in
(or Wi-Fi associates, or DHCP hands out an address), the nodes already up on
that link would otherwise wait for their next scheduled beacon, and nodes
started together beacon nearly in phase, so the first beacon after the link
comes up can be most of an interval away. mDNS (RFC 6762 section 8.3) announces
whenever an interface comes up; this module is how a node knows that::

    kernel ──RTM_NEWLINK (IFF_RUNNING) / RTM_NEWADDR──▶ netlink socket (loop reader)
          ──parse_events──▶ LinkState.observe(now) ──up──▶ on_up()  (the beacon starts its fast start again)

:func:`parse_events` is pure (bytes in, :class:`LinkEvent` out; a malformed
message is skipped and counted, never raised: the kernel is the only sender but
a short read must not kill the watch). :class:`LinkState` is pure too: an
interface *coming up* is one seen not running and now running, or seen for the
first time running; an IPv4 address added counts the same; ups closer together
than ``min_gap_s`` are one (a flapping cable costs one fast start a second).

Where rtnetlink cannot be had (not Linux, or the socket refused), :class:`LinkWatch`
logs ``linkwatch_unavailable`` with the error once and the node beacons on its
schedule alone; nothing else changes.

Log events: ``linkwatch_unavailable`` (error), ``network_up`` (interface index, why).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LINK_UP_GAP_S", "LinkEvent", "LinkState", "LinkWatch", "parse_events"]

RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
IFF_RUNNING = 0x40
AF_INET = 2
_HEADER = struct.Struct("=IHHII")
"""nlmsghdr: length, type, flags, sequence, port id (host byte order, as the kernel writes it)."""
_IFINFO = struct.Struct("=BxHiII")
"""ifinfomsg: family, (pad), device type, interface index, flags, change mask."""
_IFADDR = struct.Struct("=BBBBi")
"""ifaddrmsg: family, prefix length, flags, scope, interface index."""

LINK_UP_GAP_S = 1.0
"""Ups of the network closer together than this are one (one fast start)."""


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """An interface's state (``kind`` "link": ``running`` says whether it carries traffic) or an
    IPv4 address added to it (``kind`` "address", ``running`` True)."""

    index: int
    kind: str
    running: bool


def parse_events(data: bytes, counts: Counter[str] | None = None) -> list[LinkEvent]:
    """The link and address events in one netlink datagram; anything else is skipped
    (``counts["malformed"]`` for a message that does not parse)."""
    events: list[LinkEvent] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _flags, _seq, _pid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            if counts is not None:
                counts["malformed"] += 1
            break
        body = offset + _HEADER.size
        if kind == RTM_NEWLINK and length >= _HEADER.size + _IFINFO.size:
            _family, _type, index, flags, _change = _IFINFO.unpack_from(data, body)
            events.append(LinkEvent(index, "link", bool(flags & IFF_RUNNING)))
        elif kind == RTM_NEWADDR and length >= _HEADER.size + _IFADDR.size:
            family, _prefix, _aflags, _scope, index = _IFADDR.unpack_from(data, body)
            if family == AF_INET:
                events.append(LinkEvent(index, "address", True))
        elif kind in (RTM_NEWLINK, RTM_NEWADDR) and counts is not None:
            counts["malformed"] += 1
        offset += (length + 3) & ~3
    return events


@dataclass
class LinkState:
    """Which interfaces run; whether an event means the network just came up (pure: ``now`` is given)."""

    min_gap_s: float = LINK_UP_GAP_S
    running: dict[int, bool] = field(default_factory=dict)
    last_up: float = -float("inf")

    def observe(self, event: LinkEvent, now: float) -> bool:
        """Record ``event``; True if it brings the network up (and the last up was ``min_gap_s`` ago)."""
        if event.kind == "link":
            was = self.running.get(event.index)
            self.running[event.index] = event.running
            came_up = event.running and was is not True
        else:
            came_up = True
        if not came_up or now - self.last_up < self.min_gap_s:
            return False
        self.last_up = now
        return True


class LinkWatch:
    """Calls ``on_up`` on the loop when the network comes up (see the module docstring).

    ``start()`` on the loop that owns it, ``close()`` on the same loop. ``counts``
    holds ``events``, ``ups`` and ``malformed``.
    """

    def __init__(self, on_up: Callable[[str], None], *, log: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.on_up = on_up
        self.log = log
        self.clock = clock
        self.state = LinkState()
        self.counts: Counter[str] = Counter()
        self.available = False
        self._sock: socket.socket | None = None

    def start(self) -> None:
        """Open the rtnetlink socket and watch it (or log why not and do nothing)."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)  # type: ignore[attr-defined,unused-ignore]
        except (AttributeError, OSError) as exc:
            self.log.info("linkwatch_unavailable", error=f"{type(exc).__name__}: {exc}")
            return
        try:
            sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR))
            sock.setblocking(False)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        except OSError as exc:
            sock.close()
            self.log.info("linkwatch_unavailable", error=f"{type(exc).__name__}: {exc}")
            return
        self._sock = sock
        self.available = True

    def close(self) -> None:
        """Stop watching and close the socket."""
        sock, self._sock = self._sock, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # ENOBUFS: the kernel dropped events while we were slow; the next one still counts
                self.counts["recv_errors"] += 1
                self.log.info("linkwatch_overrun", error=f"{type(exc).__name__}: {exc}")
                continue
            self.feed(data)

    def feed(self, data: bytes) -> None:
        """One datagram from the kernel: tell ``on_up`` if it brought the network up."""
        now = self.clock()
        for event in parse_events(data, self.counts):
            self.counts["events"] += 1
            if self.state.observe(event, now):
                self.counts["ups"] += 1
                why = "interface running" if event.kind == "link" else "IPv4 address added"
                self.log.info("network_up", interface=event.index, why=why)
                self.on_up(why)
