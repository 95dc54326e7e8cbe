"""The peer registry's pure core: peer records, merging sightings, trust, and evolution peer selection.

A :class:`PeerRecord` is what this node knows about one peer: where to reach it
(addresses per transport), what it says it can do (:class:`Capabilities`, from
discovery), its public key, when it was last seen and through which transport,
and this node's own judgement of it (``trust``, ``latency_ms``). Everything
here is a pure function of its arguments: the clock is always the ``now``
parameter, and the actor (``actor.py``) persists through :mod:`.store`.

Merging a sighting (:func:`merge`)
    The newer record (by ``last_seen``; ties go to the new one) wins field by
    field, except:

    * ``addresses``: the union per transport, the newer record's addresses
      first, at most :data:`MAX_ADDRESSES_PER_TRANSPORT` per transport (oldest
      dropped), so address churn cannot grow a record without bound;
    * ``trust``: always the old record's: trust is this node's judgement,
      changed only by :func:`record_outcome`, never by what a peer announces;
    * ``capabilities``, ``latency_ms``, ``source``, ``public_key``: a missing
      value (None) never erases a known one;
    * ``public_key`` is pinned: a sighting with a *different* key for a known
      peer is refused (:class:`RemoteProtocolError`), since verified discovery
      binds the node id to the key and only a spoofer or a bug can differ.

Suitability for evolution (:func:`is_suitable_for_evolution`), the replaced
system's rule plus its older variant's trust floor::

    can_evolve and available_for_evolution
    and current_evolution_load < 0.8
    and thermal_state != "throttling"
    and (battery_percent is None or battery_percent > 20)
    and trust > 0.3                       MIN_EVOLUTION_TRUST

Evolution priority (:func:`evolution_priority`), higher is better, clamped to [0, 1]::

    0.4 · evolution_capacity
    + 0.2 · [ram_mb > 4096]
    + 0.1 · [cpu_cores ≥ 4]
    − 0.2 · [0 < battery_percent < 50]          (None = mains: no penalty)
    − 0.3 · current_evolution_load
    + 0.1 · (trust − 0.5)
    + 0.1 · clamp((200 − latency_ms) / 100, 0, 1)    latency term; unknown latency: 0

The latency term keeps the older variant's +0.1 for latency under 100 ms, but
fades linearly to 0 at 200 ms instead of dropping at a cliff, so 99 ms and
101 ms rank almost alike.

Selection (:func:`suitable_peers`) returns *every* suitable peer seen within
``max_age``, by priority (descending), ties by ``peer_id``: no cap (the
replaced system's 5-peer cap was a bug). ``min_count`` is the number the
caller needs; the result is a :class:`Selection` whose ``enough`` flag says
whether it got them. Too few is a normal answer, not an exception: the caller
may start with fewer peers, wait for discovery, or give up.

Trust (:func:`record_outcome`): +0.05 after a successful evolution, −0.02
after a failed one, clamped to [0.1, 1.0]; 0.5 for a stranger.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from villagemesh.errors import ConfigError, RemoteProtocolError

if TYPE_CHECKING:
    from villagemesh.protocols.discovery import Capabilities

__all__ = [
    "DEFAULT_TRUST",
    "MAX_ADDRESSES_PER_TRANSPORT",
    "MAX_TRUST",
    "MIN_EVOLUTION_TRUST",
    "MIN_TRUST",
    "SCHEME_TRANSPORTS",
    "Addresses",
    "Observation",
    "PeerRecord",
    "Selection",
    "adjust_trust",
    "evolution_priority",
    "expired",
    "group_addresses",
    "is_fresh",
    "is_suitable_for_evolution",
    "latency_bonus",
    "merge",
    "observe",
    "record_from_discovery",
    "record_outcome",
    "suitable_peers",
    "transport_of",
]

DEFAULT_TRUST = 0.5
"""Trust in a peer this node has no experience with."""

MIN_TRUST = 0.1
"""Trust never falls below this: a peer can always earn its way back."""

MAX_TRUST = 1.0
"""Trust never rises above this."""

TRUST_SUCCESS = 0.05
"""Added after a successful evolution with the peer."""

TRUST_FAILURE = 0.02
"""Subtracted after a failed one (slower than success: one failure is not a pattern)."""

MIN_EVOLUTION_TRUST = 0.3
"""Peers at or below this trust are not chosen for evolution (ten net failures from a stranger)."""

MAX_EVOLUTION_LOAD = 0.8
"""A peer this busy with evolution takes no more."""

MIN_BATTERY_PERCENT = 20.0
"""Below this (on battery) a device is spared."""

MAX_ADDRESSES_PER_TRANSPORT = 16
"""Addresses kept per transport (discovery's own per-message limit): bounds a record under churn."""

Addresses = tuple[tuple[str, tuple[str, ...]], ...]
"""Addresses per transport: ``((transport, (address, ...)), ...)`` sorted by transport, hashable."""


def _normalise_addresses(value: Addresses | Mapping[str, Iterable[str]]) -> Addresses:
    items = value.items() if isinstance(value, Mapping) else value
    out: dict[str, list[str]] = {}
    for transport, addresses in items:
        if not isinstance(transport, str) or not transport:
            raise ConfigError(f"transport name must be a non-empty str, got {transport!r}")
        if isinstance(addresses, str):
            raise ConfigError(f"addresses for {transport!r} must be a sequence of str, got the str {addresses!r}")
        have = out.setdefault(transport, [])
        for address in addresses:
            if not isinstance(address, str) or not address:
                raise ConfigError(f"address for {transport!r} must be a non-empty str, got {address!r}")
            if address not in have:
                have.append(address)
    return tuple(sorted((t, tuple(a[:MAX_ADDRESSES_PER_TRANSPORT])) for t, a in out.items() if a))


SCHEME_TRANSPORTS: Mapping[str, str] = {
    "ws": "websocket",
    "wss": "websocket",
    "websocket": "websocket",
    "libp2p": "libp2p",
    "bitchat": "bitchat",
    "betanet": "betanet",
}
"""URL schemes of the transports' addresses; any other scheme names itself (``tcp`` stays ``tcp``)."""


def transport_of(address: str) -> str:
    """The transport an address belongs to: its URL scheme (``ws`` → websocket), libp2p for a multiaddr.

    Raises:
        ConfigError: ``address`` is neither ``scheme://…`` nor a ``/…`` multiaddr.
    """
    if isinstance(address, str) and address.startswith("/") and len(address) > 1:
        return "libp2p"
    scheme, sep, rest = address.partition("://") if isinstance(address, str) else ("", "", "")
    if not sep or not scheme or not rest:
        raise ConfigError(f"address must look like 'transport://host:port' or a /multiaddr, got {address!r}")
    scheme = scheme.lower()
    return SCHEME_TRANSPORTS.get(scheme, scheme)


def group_addresses(urls: Iterable[str]) -> Addresses:
    """Group addresses (discovery's URLs, libp2p multiaddrs) by their transport (:func:`transport_of`)."""
    grouped: dict[str, list[str]] = {}
    for url in urls:
        grouped.setdefault(transport_of(url), []).append(url)
    return _normalise_addresses(grouped)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """What this node knows about one peer; immutable (every change makes a new record).

    Attributes:
        peer_id: the peer's node id.
        addresses: addresses per transport (a mapping is accepted and normalised).
        capabilities: what the peer last said it can do; None if no transport told us.
        public_key: its Ed25519 public key (32 bytes) once a signed sighting gave it.
        last_seen: when it was last heard from (seconds on this node's clock).
        trust: this node's trust in it, in [0.1, 1.0].
        latency_ms: the last measured round trip, if any.
        source: the transport of the last sighting.

    Raises:
        ConfigError: a field is invalid (the message names it).
    """

    peer_id: str
    addresses: Addresses
    capabilities: Capabilities | None
    public_key: bytes | None
    last_seen: float
    trust: float = DEFAULT_TRUST
    latency_ms: float | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.peer_id, str) or not self.peer_id:
            raise ConfigError(f"peer_id must be a non-empty str, got {self.peer_id!r}")
        object.__setattr__(self, "addresses", _normalise_addresses(self.addresses))
        if self.public_key is not None and not isinstance(self.public_key, bytes):
            raise ConfigError(f"public_key of {self.peer_id} must be bytes or None, got {self.public_key!r}")
        if not _finite(self.last_seen):
            raise ConfigError(f"last_seen of {self.peer_id} must be a finite number, got {self.last_seen!r}")
        if not (_finite(self.trust) and MIN_TRUST <= self.trust <= MAX_TRUST):
            raise ConfigError(f"trust of {self.peer_id} must be within [{MIN_TRUST}, {MAX_TRUST}], got {self.trust!r}")
        if self.latency_ms is not None and not (_finite(self.latency_ms) and self.latency_ms >= 0):
            raise ConfigError(f"latency_ms of {self.peer_id} must be None or ≥ 0, got {self.latency_ms!r}")
        if self.source is not None and (not isinstance(self.source, str) or not self.source):
            raise ConfigError(f"source of {self.peer_id} must be None or a transport name, got {self.source!r}")

    def addresses_for(self, transport: str) -> tuple[str, ...]:
        """The addresses known for ``transport`` (empty when none)."""
        for name, addresses in self.addresses:
            if name == transport:
                return addresses
        return ()

    @property
    def transports(self) -> tuple[str, ...]:
        """Transports the peer can be reached on: those with at least one address."""
        return tuple(name for name, _ in self.addresses)


# --- merging --------------------------------------------------------------------------------


def _union(newer: Addresses, older: Addresses) -> Addresses:
    merged: dict[str, list[str]] = {t: list(a) for t, a in newer}
    for transport, addresses in older:
        have = merged.setdefault(transport, [])
        have.extend(a for a in addresses if a not in have)
    return _normalise_addresses(merged)


def merge(old: PeerRecord, new: PeerRecord) -> PeerRecord:
    """Combine a stored record with a new sighting of the same peer (rules in the module docstring).

    Raises:
        ConfigError: the records are of different peers.
        RemoteProtocolError: the sighting carries a different public key than the pinned one.
    """
    if old.peer_id != new.peer_id:
        raise ConfigError(f"cannot merge records of different peers: {old.peer_id!r} and {new.peer_id!r}")
    if old.public_key is not None and new.public_key is not None and old.public_key != new.public_key:
        raise RemoteProtocolError(
            f"peer {old.peer_id} presented public key {new.public_key.hex()}"
            f" but {old.public_key.hex()} is pinned for it"
        )
    newer, older = (new, old) if new.last_seen >= old.last_seen else (old, new)
    return PeerRecord(
        peer_id=old.peer_id,
        addresses=_union(newer.addresses, older.addresses),
        capabilities=newer.capabilities if newer.capabilities is not None else older.capabilities,
        public_key=old.public_key if old.public_key is not None else new.public_key,
        last_seen=newer.last_seen,
        trust=old.trust,
        latency_ms=newer.latency_ms if newer.latency_ms is not None else older.latency_ms,
        source=newer.source if newer.source is not None else older.source,
    )


@dataclass(frozen=True, slots=True)
class Observation:
    """What a sighting did to the registry: the record to keep, and what changed."""

    record: PeerRecord
    new: bool
    """The peer was unknown."""
    changed: bool
    """The record differs from the stored one (so it must be written)."""
    routes_changed: bool
    """Its addresses differ (so the retrier must hear of it)."""


def observe(old: PeerRecord | None, sighting: PeerRecord) -> Observation:
    """Fold one sighting into what is known (:func:`merge`), saying what changed.

    Raises:
        RemoteProtocolError: the sighting's public key differs from the pinned one.
    """
    if old is None:
        return Observation(sighting, True, True, bool(sighting.addresses))
    merged = merge(old, sighting)
    return Observation(merged, False, merged != old, merged.addresses != old.addresses)


def record_from_discovery(
    node_id: str,
    addresses: Iterable[str],
    capabilities: Capabilities,
    public_key: bytes | None,
    *,
    now: float,
    latency_ms: float | None,
    source: str | None,
) -> PeerRecord:
    """A sighting's record from a verified discovery event's fields, seen at ``now`` (this node's clock).

    The event's own timestamp is the sender's clock: it is checked for
    freshness by the caller, never stored as ``last_seen``.
    """
    return PeerRecord(
        peer_id=node_id,
        addresses=group_addresses(addresses),
        capabilities=capabilities,
        public_key=public_key,
        last_seen=now,
        latency_ms=latency_ms,
        source=source,
    )


# --- trust ------------------------------------------------------------------------------------


def adjust_trust(trust: float, succeeded: bool) -> float:
    """Trust after one evolution outcome: +0.05 or −0.02, kept within [0.1, 1.0]."""
    changed = trust + TRUST_SUCCESS if succeeded else trust - TRUST_FAILURE
    return min(MAX_TRUST, max(MIN_TRUST, round(changed, 10)))


def record_outcome(rec: PeerRecord, succeeded: bool) -> PeerRecord:
    """``rec`` with its trust adjusted for one evolution outcome."""
    return replace(rec, trust=adjust_trust(rec.trust, succeeded))


# --- evolution selection ------------------------------------------------------------------------


def is_suitable_for_evolution(rec: PeerRecord) -> bool:
    """The replaced system's suitability rule plus the trust floor (see the module docstring)."""
    caps = rec.capabilities
    if caps is None:
        return False
    return (
        caps.can_evolve
        and caps.available_for_evolution
        and caps.current_evolution_load < MAX_EVOLUTION_LOAD
        and caps.thermal_state != "throttling"
        and (caps.battery_percent is None or caps.battery_percent > MIN_BATTERY_PERCENT)
        and rec.trust > MIN_EVOLUTION_TRUST
    )


def latency_bonus(latency_ms: float | None) -> float:
    """0.1 up to 100 ms, fading linearly to 0 at 200 ms; 0 when unknown."""
    if latency_ms is None:
        return 0.0
    return 0.1 * min(1.0, max(0.0, (200.0 - latency_ms) / 100.0))


def evolution_priority(rec: PeerRecord) -> float:
    """How good a partner for evolution the peer is, in [0, 1] (formula in the module docstring).

    A peer without capabilities scores 0.
    """
    caps = rec.capabilities
    if caps is None:
        return 0.0
    battery = caps.battery_percent
    score = (
        0.4 * caps.evolution_capacity
        + (0.2 if caps.ram_mb > 4096 else 0.0)
        + (0.1 if caps.cpu_cores >= 4 else 0.0)
        - (0.2 if battery is not None and 0 < battery < 50 else 0.0)
        - 0.3 * caps.current_evolution_load
        + 0.1 * (rec.trust - 0.5)
        + latency_bonus(rec.latency_ms)
    )
    return min(1.0, max(0.0, score))


def is_fresh(rec: PeerRecord, now: float, max_age: float) -> bool:
    """Seen within ``max_age`` seconds of ``now``."""
    return now - rec.last_seen <= max_age


@dataclass(frozen=True, slots=True)
class Selection:
    """The answer of :func:`suitable_peers`: every suitable peer, best first, and whether that is enough."""

    peers: tuple[PeerRecord, ...]
    min_count: int

    @property
    def enough(self) -> bool:
        """At least ``min_count`` peers were found."""
        return len(self.peers) >= self.min_count

    @property
    def missing(self) -> int:
        """How many more the caller wanted (0 when enough)."""
        return max(0, self.min_count - len(self.peers))

    @property
    def peer_ids(self) -> tuple[str, ...]:
        """The selected peers' ids, best first."""
        return tuple(p.peer_id for p in self.peers)


def suitable_peers(records: Iterable[PeerRecord], min_count: int, *, now: float, max_age: float) -> Selection:
    """Every fresh, suitable peer by evolution priority (descending), ties by ``peer_id``; no cap.

    ``min_count`` is what the caller needs: the result says whether it got them
    (:attr:`Selection.enough`); it never pads, truncates or raises for too few.

    Raises:
        ConfigError: ``min_count`` < 0 or ``max_age`` < 0.
    """
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
        raise ConfigError(f"min_count must be an int ≥ 0, got {min_count!r}")
    if not (_finite(max_age) and max_age >= 0):
        raise ConfigError(f"max_age must be seconds ≥ 0, got {max_age!r}")
    chosen = [r for r in records if is_fresh(r, now, max_age) and is_suitable_for_evolution(r)]
    chosen.sort(key=lambda r: (-evolution_priority(r), r.peer_id))
    return Selection(tuple(chosen), min_count)


def expired(records: Iterable[PeerRecord], now: float, max_age: float) -> list[str]:
    """Ids of the peers not seen for more than ``max_age`` seconds, sorted."""
    return sorted(r.peer_id for r in records if not is_fresh(r, now, max_age))
