"""The libp2p actor's pure decisions: addresses, identities, limits, and what an outcome tells the asker.

Nothing here touches a socket or the loop; :mod:`.host` and :mod:`.actor` call in.

Addresses are multiaddrs ``/ip4/<host>/tcp/<port>/p2p/<peer id>`` (or ``/ip6/…``): the
``/p2p/`` part is required, because the dialled peer id is what the Noise handshake
checks (a peer proving another id is refused before a byte of ours is sent). A
villagemesh node's peer id is the identity multihash of its Ed25519 node key, and its
node id the first 16 bytes of SHA-256 of the same key, so one key maps to both::

    node key (Ed25519 public) ──PeerId.from_ed25519──▶ peer id 12D3KooW…
                              └─node_id_from_public_key─▶ node id (hex)

Transmit outcomes are the kit's (:func:`villagemesh.actors.core.transport.transmit_outcome`).

Limits (each with the reason it is what it is), :class:`Libp2pLimits`::

    handshake_timeout_s   10.0   TCP accepted → Noise + yamux agreed; every step is one round trip,
                                 10 s covers a slow radio link and a loaded node
    connect_timeout_s      5.0   the TCP connect of a dial
    send_timeout_s         5.0   a send waiting for the peer's yamux credit or the socket's buffer
    max_pending_dials       64   dials in progress at once: each holds a socket and a timer
    max_queued_bytes   8 MiB     bytes one envelope stream may hold waiting for credit before a
                                 send waits (eight full envelopes)
    max_frame         MAX_MESSAGE_BYTES   one envelope frame: the envelope codec's own cap
    window             1 MiB     each stream's receive window (yamux's is 256 KiB: one window per round
                                 trip bounds a stream, and py-libp2p sends no faster than we grant)
    dial_backoff_s       1.0     after a failed dial, dials to that address fail at once for this long,
    dial_backoff_max_s  10.0     doubling per failure up to the max (go-libp2p's swarm does the same,
                                 5 s to 5 min): a peer that is down is not dialled once per retried
                                 envelope (a thousand queued envelopes made a thousand dials a
                                 second); an inbound connection from the peer is used at once all the
                                 same, and a dial that succeeds clears the address's backoff

The per-connection stream cap is yamux's (``MAX_STREAMS`` 256), and so are the bounds of
``window`` (``INITIAL_WINDOW`` … ``MAX_WINDOW``); multistream lines are bounded by ``MAX_LINE``.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

from villagemesh.errors import ConfigError, ConnectError, RemoteProtocolError
from villagemesh.protocols.discovery import node_id_from_public_key
from villagemesh.protocols.envelope import MAX_MESSAGE_BYTES
from villagemesh.protocols.libp2p.identify import IDENTIFY_PROTOCOL, PING_PROTOCOL
from villagemesh.protocols.libp2p.kad import KadPeer
from villagemesh.protocols.libp2p.peerid import Multiaddr, PeerId
from villagemesh.protocols.libp2p.yamux import INITIAL_WINDOW, MAX_WINDOW

__all__ = [
    "ANNOUNCE_PROTOCOL",
    "ENVELOPE_PROTOCOL",
    "MAX_PROVIDERS_PER_KEY",
    "MAX_PROVIDER_KEYS",
    "PROVIDER_TTL_S",
    "SERVED_PROTOCOLS",
    "TRANSPORT",
    "DialBackoff",
    "Libp2pLimits",
    "ProviderStore",
    "Target",
    "listen_multiaddr",
    "node_id_of",
    "target_of",
]

TRANSPORT = "libp2p"
"""This transport's name (and its actor's bus name in a node)."""

ENVELOPE_PROTOCOL = "/villagemesh/envelope/1.0.0"
"""Our stream protocol: ``uvarint(len) ‖ encode_message(...)`` frames, many per stream, one way."""

ANNOUNCE_PROTOCOL = "/villagemesh/announce/1.0.0"
"""Our stream protocol for discovery: the listener writes its signed announce (``uvarint(len) ‖`` the
discovery JSON) and closes; a node found in the DHT is asked this before it becomes a sighting."""

SERVED_PROTOCOLS = (ENVELOPE_PROTOCOL, ANNOUNCE_PROTOCOL, PING_PROTOCOL, IDENTIFY_PROTOCOL)
"""What an inbound stream may speak (and what identify lists)."""


@dataclass(frozen=True, slots=True)
class Libp2pLimits:
    """The actor's limits as one value (tests shorten them)."""

    handshake_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    send_timeout_s: float = 5.0
    max_pending_dials: int = 64
    max_queued_bytes: int = 8 * 1024 * 1024
    max_frame: int = MAX_MESSAGE_BYTES
    window: int = 1024 * 1024
    dial_backoff_s: float = 1.0
    dial_backoff_max_s: float = 10.0

    def __post_init__(self) -> None:
        if not (isinstance(self.dial_backoff_s, int | float) and self.dial_backoff_s >= 0):
            raise ConfigError(f"libp2p dial_backoff_s must be >= 0 seconds, got {self.dial_backoff_s!r}")
        if not (isinstance(self.dial_backoff_max_s, int | float) and self.dial_backoff_max_s >= self.dial_backoff_s):
            raise ConfigError(
                f"libp2p dial_backoff_max_s must be >= dial_backoff_s ({self.dial_backoff_s}),"
                f" got {self.dial_backoff_max_s!r}"
            )
        for name in ("handshake_timeout_s", "connect_timeout_s", "send_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"libp2p {name} must be > 0 seconds, got {value!r}")
        for name in ("max_pending_dials", "max_queued_bytes", "max_frame", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"libp2p {name} must be an integer >= 1, got {value!r}")
        if not INITIAL_WINDOW <= self.window <= MAX_WINDOW:
            raise ConfigError(f"libp2p window must be {INITIAL_WINDOW} … {MAX_WINDOW} bytes, got {self.window!r}")


class DialBackoff:
    """Which addresses failed a dial lately, and until when a new dial there fails at once.

    Pure: the caller passes ``now`` (the loop's clock). The first failure backs an address off
    for ``base`` seconds, each further one doubles it up to ``cap``; a success forgets the
    address. At most ``capacity`` addresses are remembered (the oldest failure is forgotten
    first), so a flood of bad addresses cannot grow it.
    """

    def __init__(self, base: float, cap: float, capacity: int = 1024) -> None:
        self.base, self.cap, self.capacity = base, cap, capacity
        self._failed: OrderedDict[str, tuple[float, int, str]] = OrderedDict()
        """address -> (dials fail at once until, failures in a row, the last failure's reason)"""

    def check(self, address: str, now: float) -> None:
        """Nothing if ``address`` may be dialled at ``now``.

        Raises:
            ConnectError: it is backed off (naming it, how long is left and the failure behind it).
        """
        entry = self._failed.get(address)
        if entry is not None and now < entry[0]:
            until, failures, reason = entry
            raise ConnectError(
                f"libp2p {address}: in dial backoff for {until - now:.2f} s more"
                f" after {failures} failed dial(s), the last: {reason}"
            )

    def failed(self, address: str, reason: str, now: float) -> float:
        """Record a failed dial; returns the backoff it starts (seconds)."""
        _, failures, _ = self._failed.pop(address, (0.0, 0, ""))
        delay = min(self.cap, self.base * 2**failures)
        self._failed[address] = (now + delay, failures + 1, reason)
        while len(self._failed) > self.capacity:
            self._failed.popitem(last=False)
        return delay

    def succeeded(self, address: str) -> None:
        """A dial there worked: its backoff is over."""
        self._failed.pop(address, None)

    def __len__(self) -> int:
        return len(self._failed)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a dial goes and whom it must meet there."""

    host: str
    port: int
    peer_id: PeerId


def target_of(address: str) -> Target:
    """The host, port and peer id of ``/ip4|ip6/<host>/tcp/<port>/p2p/<id>``.

    Raises:
        ConnectError: ``address`` is no such multiaddr (naming it): nothing can be sent there.
    """
    try:
        multiaddr = Multiaddr.parse(address)
        peer = multiaddr.peer_id()
    except RemoteProtocolError as exc:
        raise ConnectError(f"libp2p address {address!r:.120} is not a multiaddr: {exc}") from exc
    host = multiaddr.value("ip4") or multiaddr.value("ip6")
    port = multiaddr.value("tcp")
    if host is None or port is None or peer is None:
        raise ConnectError(f"libp2p address {address!r:.120} needs /ip4 or /ip6, /tcp and /p2p parts")
    return Target(host, int(port), peer)


def node_id_of(peer_id: PeerId) -> str:
    """The villagemesh node id of an Ed25519 peer id.

    Raises:
        RemoteProtocolError: the peer id inlines no Ed25519 key (a hashed id names no key by itself).
    """
    key = peer_id.ed25519_public_key()
    if key is None:
        raise RemoteProtocolError(f"libp2p peer {peer_id} has no inlined Ed25519 key: not a villagemesh node")
    return node_id_from_public_key(key)


def listen_multiaddr(host: str, port: int, peer_id: PeerId | None = None) -> str:
    """``/ip4/<host>/tcp/<port>[/p2p/<id>]`` (``/ip6`` for an IPv6 host).

    Raises:
        ConfigError: ``host`` is not an IP address (a multiaddr of a name needs ``/dns``, not read here).
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(f"libp2p listens on IP addresses only, got host {host!r}") from exc
    text = f"/ip{ip.version}/{ip}/tcp/{port}"
    return text if peer_id is None else f"{text}/p2p/{peer_id}"


PROVIDER_TTL_S = 24 * 3600.0
"""How long a provider record is kept (go-libp2p keeps 48 h and republishes every 22 h; our
nodes provide every discovery round, so a day is ample)."""

MAX_PROVIDER_KEYS = 1024
"""Keys we keep provider records for: the oldest key goes when a new one would pass it."""

MAX_PROVIDERS_PER_KEY = 64
"""Providers per key (a kad answer lists at most 64 peers in all)."""


class ProviderStore:
    """Provider records by key, bounded and expiring; the clock is the caller's ``now``."""

    def __init__(self) -> None:
        self._records: OrderedDict[bytes, OrderedDict[bytes, tuple[KadPeer, float]]] = OrderedDict()

    def add(self, key: bytes, peer: KadPeer, now: float) -> None:
        """``peer`` provides ``key`` as of ``now`` (its record is renewed; the oldest goes past a bound)."""
        records = self._records.pop(key, None) or OrderedDict()
        self._records[key] = records
        records.pop(peer.peer_id.multihash, None)
        records[peer.peer_id.multihash] = (peer, now)
        while len(records) > MAX_PROVIDERS_PER_KEY:
            records.popitem(last=False)
        while len(self._records) > MAX_PROVIDER_KEYS:
            self._records.popitem(last=False)

    def get(self, key: bytes, now: float) -> list[KadPeer]:
        """The live providers of ``key``, newest last (expired records are dropped)."""
        records = self._records.get(key)
        if records is None:
            return []
        for multihash in [m for m, (_, at) in records.items() if now - at > PROVIDER_TTL_S]:
            del records[multihash]
        if not records:
            del self._records[key]
        return [peer for peer, _ in records.values()]
