"""LAN discovery beacons: signed announces over UDP multicast, broadcast as the fallback.

One UDP socket per node, bound to the beacon port on every address
(``SO_REUSEADDR`` + ``SO_REUSEPORT``, so several nodes on one host share the
port; multicast and broadcast datagrams reach every socket bound to it)::

    every schedule.delay(n):  identity.announce() ──encode──▶ group:port   (multicast, TTL 1, loop on)
                                                         or ▶ broadcast:port (fallback)
    datagram from src ──▶ rate limit(src) ──▶ decode + verify ──▶ not ours? ──▶ on_peer(announce, body, src)
                              │ over                │ garbage / bad signature / not an ANNOUNCE
                              ▼                     ▼
                          dropped, counted      dropped, counted, ``beacon_rejected`` logged

The network coming up (a cable plugged in, an IPv4 address added) starts the
schedule over: the LAN actor's Linux rtnetlink watch (:mod:`.linkwatch`) calls
:meth:`BeaconEndpoint.network_up`, a beacon goes out within ``LINK_UP_PAUSE_S`` and
the fast start runs again, as mDNS announces when an interface comes up. Without
it, nodes started together beacon nearly in phase and the first beacon after a
link came up could be most of an interval away.

Defaults: group ``239.255.42.99`` (the organisation-local scope 239.255/16 of
RFC 2365: never routed off-site), port ``42424``, TTL 1 (this link only),
``IP_MULTICAST_LOOP`` on (nodes on one host hear each other). The interface is
an IPv4 address (``0.0.0.0`` lets the kernel pick by route; tests use
``127.0.0.1``).

Fallback: if joining the group fails (no multicast route, an interface that
cannot do it), the endpoint logs ``multicast_unavailable`` with the error and
sends to ``broadcast_address`` (``255.255.255.255`` by default; the interface's
directed broadcast, e.g. ``192.168.1.255``, is better where known) with
``SO_BROADCAST``. Receiving needs nothing more: the socket listens on the port
on every address, so it hears broadcasts and, if joined, the group.

The datagram handler never raises: every failure is a counted drop. Only
announces are accepted (an unsigned request or a response has no business
here); the signature is checked by the codec; rate limiting comes *before*
decoding so a flood costs a dictionary lookup per datagram, not a signature
check. Our own beacons (looped back) are recognised by node id and skipped.

Log events: ``multicast_unavailable`` (group, interface, error),
``beacon_rejected`` (source, reason), ``peer_discovered`` (source, node_id,
addresses; once per node id per endpoint, later beacons are quiet),
``beacon_send_failed`` (destination, error).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from villagemesh.actors.lan.identity import Identity
from villagemesh.actors.lan.state import BURST, RATE_PER_S, BeaconSchedule, SourceRateLimiter
from villagemesh.errors import ConfigError, ConnectError, RemoteProtocolError
from villagemesh.protocols.discovery import Announce, decode_discovery, encode_discovery

__all__ = ["DEFAULT_GROUP", "DEFAULT_PORT", "BeaconConfig", "BeaconEndpoint", "OnPeer"]

DEFAULT_GROUP = "239.255.42.99"
"""Organisation-local multicast scope (RFC 2365): stays on site."""

DEFAULT_PORT = 42424
"""The beacon port every villagemesh node listens on."""

OnPeer = Callable[[Announce, bytes, tuple[str, int]], None]
"""Receives each verified announce of another node, the datagram it came in (its signed JSON
body, to pass on without encoding it again) and its source address (on the loop's thread)."""


REHEAR_S = 1.0
"""A peer's beacons are verified at most once per this many seconds by each receiver."""

REFRESH_S = 30.0
"""A beacon that claims exactly what a peer's last verified one said (addresses, capabilities) is
verified again only after this long: it would only refresh the peer's last-seen time, which
matters on the scale of the registry's max_age (300 s). A claim that differs is verified at once
(after REHEAR_S)."""

LINK_UP_PAUSE_S = 0.1
"""After the network came up, the first beacon goes out within this many seconds (uniformly drawn)."""

MAX_REMEMBERED = 4096
"""Peers whose last verification time is remembered (oldest forgotten first)."""


_CLAIMED_ID = re.compile(rb'"node_id":\s*"([0-9a-f]{32})"')
_UNSIGNED = re.compile(rb'"(?:signature|timestamp)":\s*(?:"[0-9a-f]*"|[-+.0-9eE]+)')


def _claim(data: bytes) -> tuple[str | None, bytes]:
    """The ``node_id`` a datagram claims and a digest of what it says, unverified: ``(None, b"")``
    if it names no node id. What it says is the datagram without its timestamp and signature (a
    node re-signs the same announce for every beacon), to tell an unchanged beacon from a changed
    one. Read by pattern, not parsed (a parse cost more than the rest of a skipped beacon): a
    claim only ever lets a datagram be skipped as a repeat of one that verified, so a datagram
    read wrongly is at worst skipped or checked, as one that claims falsely is today."""
    found = _CLAIMED_ID.search(data)
    if found is None:
        return None, b""
    return found.group(1).decode("ascii"), hashlib.blake2b(_UNSIGNED.sub(b"", data), digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class BeaconConfig:
    """Where and how beacons go (defaults in the module docstring)."""

    group: str = DEFAULT_GROUP
    port: int = DEFAULT_PORT
    interface: str = "0.0.0.0"
    ttl: int = 1
    broadcast_address: str = "255.255.255.255"
    force_broadcast: bool = False
    """Skip multicast (for networks known to drop it, and to test the fallback)."""
    rate_per_s: float = RATE_PER_S
    burst: float = BURST
    schedule: BeaconSchedule = field(default_factory=BeaconSchedule)

    def __post_init__(self) -> None:
        try:
            group = socket.inet_aton(self.group)
            socket.inet_aton(self.interface)
            socket.inet_aton(self.broadcast_address)
        except OSError as exc:
            raise ConfigError(f"beacon addresses must be IPv4: {self.group!r}, {self.interface!r}: {exc}") from exc
        if not 224 <= group[0] <= 239:
            raise ConfigError(f"beacon group {self.group!r} is not an IPv4 multicast address")
        if not 0 < self.port < 65536 or not 1 <= self.ttl <= 255:
            raise ConfigError(f"beacon port {self.port!r} or ttl {self.ttl!r} out of range")


class BeaconEndpoint:
    """Sends our signed announce on a schedule and hears everyone else's.

    Run ``await start()`` on the loop that will own it, ``await close()`` on
    the same loop. ``counts`` holds ``sent``, ``accepted``, ``own``,
    ``rate_limited``, ``rejected``, ``callback_failed`` (and the LAN actor's ``answers``:
    beacons sent early for a newcomer).
    """

    def __init__(
        self,
        identity: Identity,
        on_peer: OnPeer,
        config: BeaconConfig | None = None,
        *,
        log: Any = None,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.identity = identity
        self.node_id = identity.node_id
        self.on_peer = on_peer
        self.config = config or BeaconConfig()
        self.log = log if log is not None else structlog.get_logger("villagemesh.lan")
        self.clock = clock
        self.draw = draw
        self.limiter = SourceRateLimiter(self.config.rate_per_s, self.config.burst)
        self.counts: Counter[str] = Counter()
        self.mode = "multicast"
        self.destination = (self.config.group, self.config.port)
        self._seen: set[str] = set()
        self._verified_at: dict[str, tuple[float, bytes]] = {}
        """node id -> when its beacon was last verified and what it said (see :func:`_claim`)."""
        self._transport: asyncio.DatagramTransport | None = None
        self._sender: asyncio.Task[None] | None = None
        self._again: asyncio.Event | None = None
        """Set when the network came up: the schedule starts over (see :meth:`network_up`)."""
        self._next_at = 0.0
        """When (``clock``) the next scheduled beacon goes out, at the latest."""

    async def start(self) -> None:
        """Open the socket, join the group (or fall back to broadcast) and start beaconing."""
        sock = self._open_socket()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _BeaconProtocol(self), sock=sock)
        self._transport = transport
        self._again = asyncio.Event()
        self._sender = loop.create_task(self._beacon_forever(), name="lan-beacon")

    def network_up(self, why: str = "") -> None:
        """The network just came up (a cable, an address): beacon within :data:`LINK_UP_PAUSE_S`
        and run the fast start again, as mDNS announces on an interface coming up. On the loop."""
        self.counts["network_up"] += 1
        if self._again is not None:
            self._next_at = self.clock() + LINK_UP_PAUSE_S
            self._again.set()

    def next_beacon_in(self) -> float:
        """Seconds until the next scheduled beacon goes out at the latest (0 when it is due)."""
        return max(0.0, self._next_at - self.clock())

    def _open_socket(self) -> socket.socket:
        cfg = self.config
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("", cfg.port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ConnectError(f"cannot bind the beacon port {cfg.port}: {exc}") from exc
        if cfg.force_broadcast:
            self._fall_back(sock, "multicast disabled by configuration (force_broadcast)")
            return sock
        try:
            iface = socket.inet_aton(cfg.interface)
            mreq = struct.pack("4s4s", socket.inet_aton(cfg.group), iface)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, iface)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, cfg.ttl)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        except OSError as exc:
            self._fall_back(sock, f"{type(exc).__name__}: {exc}")
        return sock

    def _fall_back(self, sock: socket.socket, error: str) -> None:
        cfg = self.config
        self.log.warning("multicast_unavailable", group=cfg.group, interface=cfg.interface, error=error)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        self.mode = "broadcast"
        self.destination = (cfg.broadcast_address, cfg.port)

    async def close(self) -> None:
        """Stop beaconing and close the socket."""
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            await asyncio.wait([sender])  # its end, not its CancelledError; our own caller's cancel still raises
            if not sender.cancelled() and sender.exception() is not None:
                raise sender.exception()  # type: ignore[misc]  # a bug in the beacon loop: not ours to hide
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def send_now(self) -> None:
        """Send one beacon at once (also done on the schedule)."""
        assert self._transport is not None
        try:
            self._transport.sendto(encode_discovery(self.identity.announce()), self.destination)
        except OSError as exc:
            # A down interface or a missing route: the next beacon tries again.
            self.log.warning(
                "beacon_send_failed", destination=f"{self.destination[0]}:{self.destination[1]}", error=str(exc)
            )
            return
        self.counts["sent"] += 1

    async def _beacon_forever(self) -> None:
        assert self._again is not None
        sent = 0
        while True:
            self.send_now()
            self._again.clear()
            delay = self.config.schedule.delay(sent, self.draw())
            self._next_at = self.clock() + delay
            sent += 1
            try:
                # Not asyncio.wait_for: on 3.11 it swallows a cancel that comes as the event is set
                # (it returns the event's result instead), and this loop would then beacon on after close().
                async with asyncio.timeout(delay):
                    await self._again.wait()
            except TimeoutError:
                continue
            # The network came up: start over, after a short pause drawn at random (the link's
            # other nodes heard the same news; their beacons spread over the pause).
            sent = 0
            await asyncio.sleep(LINK_UP_PAUSE_S * self.draw())

    # -- receiving (called by the protocol; never raises) ------------------------------------------

    def datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        """One datagram from ``addr``: rate limit, verify, hand on."""
        source = addr[0]
        now = self.clock()
        if not self.limiter.allow(source, now):
            self.counts["rate_limited"] += 1
            return
        # Signature checks are the cost of a beacon. Our own (multicast loops back), a peer
        # verified under REHEAR_S ago, and a peer repeating exactly what it said when last
        # verified (under REFRESH_S ago) tell nothing new: skip them on what they claim, which
        # is safe, since a claim is only remembered after its signature verified.
        claimed, said = _claim(data)
        if claimed == self.node_id:
            self.counts["own"] += 1
            return
        last = self._verified_at.get(claimed) if claimed is not None else None
        if last is not None and (now - last[0] < REHEAR_S or (said == last[1] and now - last[0] < REFRESH_S)):
            self.counts["recent"] += 1
            return
        try:
            event = decode_discovery(data)
        except RemoteProtocolError as exc:
            self._rejected(addr, str(exc))
            return
        if not isinstance(event, Announce):
            self._rejected(addr, f"{type(event).__name__} is not an announce")
            return
        if event.node_id == self.node_id:
            self.counts["own"] += 1
            return
        self.counts["accepted"] += 1
        if len(self._verified_at) >= MAX_REMEMBERED and event.node_id not in self._verified_at:
            self._verified_at.pop(next(iter(self._verified_at)))
        self._verified_at[event.node_id] = (now, said if claimed == event.node_id else b"")
        if event.node_id not in self._seen:
            self._seen.add(event.node_id)
            self.log.info(
                "peer_discovered", source=f"{addr[0]}:{addr[1]}", node_id=event.node_id, addresses=list(event.addresses)
            )
        try:
            self.on_peer(event, data, addr)
        except Exception as exc:  # noqa: BLE001 - a broken consumer must not stop the endpoint hearing others
            self.counts["callback_failed"] += 1
            self.log.error("peer_callback_failed", source=f"{addr[0]}:{addr[1]}", error=f"{type(exc).__name__}: {exc}")

    def _rejected(self, addr: tuple[str, int], reason: str) -> None:
        self.counts["rejected"] += 1
        self.log.warning("beacon_rejected", source=f"{addr[0]}:{addr[1]}", reason=reason)


class _BeaconProtocol(asyncio.DatagramProtocol):
    def __init__(self, endpoint: BeaconEndpoint) -> None:
        self.endpoint = endpoint

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.endpoint.datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier sends (e.g. unreachable): the next beacon tries again.
        self.endpoint.counts["send_errors"] += 1
