"""The peer registry actor: a thin shell around :mod:`.state` (decisions) and :mod:`.store` (the file).

::

    sweeper ──Sighted──┐
    lan ──PeerAnnounced┼─► decode + verify + freshness ─► observe() ─► PeerStore.upsert ─► routes_to: PeerRoutes
    anyone ──PeerSeen──┘                                   (pure)        (committed)
    timer ──_Expire──► PeerStore.expire ─► routes_to: PeerRoutes(peer, ()) , log peer_expired
    asks: GetPeer, ListPeers, FindSuitablePeers, ListRoutes ─► answered from the in-memory copy

The file is the truth: ``on_start`` loads every record from it (so a restarted
registry, or a restarted node, loses nothing) and every change is committed
before anyone is told about it. The in-memory dict is a cache of the file.

Signed discovery events are decoded and verified again here
(:func:`~villagemesh.protocols.discovery.decode_discovery`): the registry does
not trust the forwarding actor. An announce whose timestamp is more than
``announce_skew`` seconds away from this node's clock is refused (a replayed
old announce must not bring back a peer's old addresses).

Config (``ctx.config``, msgpack-able values): ``path`` (the SQLite file,
required), ``max_age`` (seconds without a sighting before a peer expires,
default 300: ten missed 30-second heartbeats), ``expire_every`` (seconds
between expiry sweeps, default 30), ``announce_skew`` (default 600),
``routes_to`` (bus name told ``PeerRoutes`` on changes, e.g. ``retrier``;
none by default), ``max_peers`` (default :data:`DEFAULT_MAX_PEERS`).

Capacity. Anyone can make keys and sign announces for them (a Sybil flood
through peer exchange costs the flooder one signature per fake peer), so the
registry holds at most ``max_peers``: a new peer beyond that evicts the one
seen longest ago (``peer_evicted``), never the newcomer and never a peer of
the same batch; a flood thus displaces only the stalest entries, the ones
expiry would take next.

Log events: ``peer_discovered`` (peer_id, source, transports), ``peer_updated``
(peer_id, source, transports) when its addresses changed, ``peer_expired``
(peer_id, last_seen), ``peer_forgotten`` (peer_id), ``peer_evicted`` (peer_id,
last_seen), ``sighting_rejected`` (source, reason).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from villagemesh.actors.core.base import Actor, ActorContext, Request
from villagemesh.actors.core.bus import Sender
from villagemesh.actors.lan.messages import PeerAnnounced
from villagemesh.actors.sweeper.messages import Sighted
from villagemesh.errors import BusError, CodecError, ConfigError, ProtocolError
from villagemesh.protocols.discovery import Announce, DiscoveryResponse, decode_discovery

from .messages import (
    EvolutionOutcome,
    FindSuitablePeers,
    ForgetPeer,
    GetPeer,
    ListPeers,
    ListRoutes,
    PeerInfo,
    PeerList,
    PeerReply,
    PeerRoutes,
    PeerSeen,
    RoutesList,
    SuitablePeersReply,
    capabilities_from_text,
)
from .state import PeerRecord, group_addresses, observe, record_from_discovery, record_outcome, suitable_peers
from .store import PeerStore

__all__ = ["RegistryActor", "find_suitable_peers", "get_peer", "list_peers", "record_evolution_outcome"]

DEFAULT_MAX_AGE = 300.0
DEFAULT_EXPIRE_EVERY = 30.0
DEFAULT_ANNOUNCE_SKEW = 600.0
DEFAULT_MAX_PEERS = 10_000
"""Peers a registry holds (ranking is O(n) per query): far more than a village network."""


class _Expire:
    """Timer: sweep stale peers."""


_SIGHTINGS = (Sighted, PeerAnnounced, PeerSeen)
"""The messages that bring records in (folded together when several wait)."""

BATCH_LIMIT = 256
"""Messages one turn takes from the mailbox (their sightings are committed together)."""


def _positive(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"registry config {key!r} must be seconds > 0, got {value!r}")
    return float(value)


LAST_SEEN_WRITE_S = 10.0
"""A peer's freshness alone is written to the file at most this often (every sighting
would be a commit: thousands a second in a lab of many nodes on one host)."""


def _only_fresher(old: PeerRecord, new: PeerRecord) -> bool:
    """Whether ``new`` differs from ``old`` only in last_seen, latency and source."""
    return replace(new, last_seen=old.last_seen, latency_ms=old.latency_ms, source=old.source) == old


class RegistryActor(Actor):
    """Keeps every known peer, persisted; answers who is out there and who is fit to evolve with."""

    def __init__(self, ctx: ActorContext) -> None:
        super().__init__(ctx)
        cfg = dict(ctx.config)
        path = cfg.get("path")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"the registry needs config['path'] (its SQLite file), got {path!r}")
        self.path = path
        self.max_age = _positive(cfg, "max_age", DEFAULT_MAX_AGE)
        self.expire_every = _positive(cfg, "expire_every", DEFAULT_EXPIRE_EVERY)
        self.announce_skew = _positive(cfg, "announce_skew", DEFAULT_ANNOUNCE_SKEW)
        self.max_peers = cfg.get("max_peers", DEFAULT_MAX_PEERS)
        if isinstance(self.max_peers, bool) or not isinstance(self.max_peers, int) or self.max_peers < 1:
            raise ConfigError(f"registry config 'max_peers' must be an int >= 1, got {self.max_peers!r}")
        routes_to = cfg.get("routes_to")
        self.routes_to: str | None = str(routes_to) if routes_to else None
        self.peers: dict[str, PeerRecord] = {}

    # -- lifecycle (in the actor's thread) -----------------------------------------------------

    def on_start(self) -> None:
        self.store = PeerStore(self.path)
        self.peers = {rec.peer_id: rec for rec in self.store.all()}
        self._persisted_seen: dict[str, float] = {peer_id: rec.last_seen for peer_id, rec in self.peers.items()}
        self.schedule(self.expire_every, _Expire())

    def on_stop(self) -> None:
        self.store.close()

    # -- messages --------------------------------------------------------------------------------

    batch_limit = BATCH_LIMIT

    def handle_batch(self, batch: list[Request]) -> None:
        """Every message waiting, in order; each run of sightings (``Sighted``, ``PeerAnnounced``,
        ``PeerSeen``) is folded in as one: one transaction, one round of route events. A
        hundred beacons heard at once (every node of a LAN plugged in together) cost one
        commit, not a hundred."""
        now = time.time()
        run: list[PeerRecord] = []
        for request in batch:
            msg = request.msg
            if isinstance(msg, _SIGHTINGS):
                run.extend(self._records(msg, now))
                continue
            if run:
                self._observe_all(run)
                run = []
            answer = self.handle(msg)
            if request.token is not None:
                request.token.reply(answer)
        if run:
            self._observe_all(run)

    def handle(self, msg: Any) -> Any:
        """Dispatch one message (the protocol is in :mod:`.messages`)."""
        now = time.time()
        if isinstance(msg, _SIGHTINGS):
            self._observe_all(self._records(msg, now))
        elif isinstance(msg, EvolutionOutcome):
            self._outcome(msg)
        elif isinstance(msg, ForgetPeer):
            self._forget(msg.peer_id)
        elif isinstance(msg, _Expire):
            self._expire(now)
            self.schedule(self.expire_every, _Expire())
        elif isinstance(msg, GetPeer):
            rec = self.peers.get(msg.peer_id)
            return PeerReply(None if rec is None else PeerInfo.of(rec))
        elif isinstance(msg, ListPeers):
            return PeerList(tuple(PeerInfo.of(self.peers[k]) for k in sorted(self.peers)))
        elif isinstance(msg, FindSuitablePeers):
            max_age = self.max_age if msg.max_age is None else msg.max_age
            chosen = suitable_peers(self.peers.values(), msg.min_count, now=now, max_age=max_age)
            return SuitablePeersReply(tuple(PeerInfo.of(p) for p in chosen.peers), msg.min_count, chosen.enough)
        elif isinstance(msg, ListRoutes):
            routes = RoutesList(tuple(PeerRoutes.of(self.peers[k]) for k in sorted(self.peers)))
            if msg.reply_to is None:
                return routes
            self._send(msg.reply_to, routes)
        else:
            raise TypeError(f"registry got an unexpected {type(msg).__name__}")
        return None

    def _signed(self, body: bytes, source: str, latency_ms: float | None, now: float) -> PeerRecord | None:
        """The record a signed announce gives, or None (rejected and logged)."""
        try:
            event = decode_discovery(body)
        except ProtocolError as exc:
            self._rejected(source, str(exc))
            return None
        if not isinstance(event, Announce | DiscoveryResponse):
            self._rejected(source, f"{type(event).__name__} is not a signed announce")
            return None
        if abs(now - event.timestamp) > self.announce_skew:
            self._rejected(
                source, f"announce of {event.node_id} is {now - event.timestamp:.0f} s off this node's clock"
            )
            return None
        return record_from_discovery(
            event.node_id,
            event.addresses,
            event.capabilities,
            event.public_key,
            now=now,
            latency_ms=latency_ms,
            source=source,
        )

    def _records(self, msg: Sighted | PeerAnnounced | PeerSeen, now: float) -> list[PeerRecord]:
        """The records one sighting message gives (the rejected ones logged and left out)."""
        if isinstance(msg, Sighted):
            records = [self._signed(s.announce.encode(), s.transport, s.latency_ms, now) for s in msg.sightings]
        elif isinstance(msg, PeerAnnounced):
            records = [self._signed(msg.announce, "lan", None, now)]
        else:
            records = [self._seen(msg, now)]
        return [rec for rec in records if rec is not None]

    def _seen(self, msg: PeerSeen, now: float) -> PeerRecord | None:
        try:
            rec = PeerRecord(
                peer_id=msg.peer_id,
                addresses=group_addresses(msg.addresses),
                capabilities=capabilities_from_text(msg.capabilities),
                public_key=msg.public_key,
                last_seen=now if msg.last_seen is None else msg.last_seen,
                latency_ms=msg.latency_ms,
                source=msg.source,
            )
        except (ConfigError, CodecError) as exc:
            self._rejected(msg.source or "unknown", str(exc))
            return None
        return rec

    def _observe_all(self, records: list[PeerRecord]) -> None:
        """Fold sightings into the registry: the changed records are written in one transaction,
        and only once it committed is anyone told (log events, routes)."""
        written: dict[str, tuple[PeerRecord, bool, bool]] = {}
        for rec in records:
            source = rec.source or "unknown"
            try:
                seen = observe(self.peers.get(rec.peer_id), rec)
            except ProtocolError as exc:  # a different key for a pinned peer
                self._rejected(source, str(exc))
                continue
            if not seen.changed:
                continue
            old = self.peers.get(rec.peer_id)
            self.peers[rec.peer_id] = seen.record
            if old is not None and not (seen.new or seen.routes_changed) and _only_fresher(old, seen.record):
                persisted = self._persisted_seen.get(rec.peer_id, old.last_seen)
                if seen.record.last_seen - persisted < LAST_SEEN_WRITE_S and rec.peer_id not in written:
                    # Only freshness moved: keep it in memory; the file gets it at most every
                    # LAST_SEEN_WRITE_S (a crash loses that much freshness, nothing else).
                    continue
            new, routes = written.get(rec.peer_id, (rec, False, False))[1:]
            written[rec.peer_id] = (seen.record, new or seen.new, routes or seen.routes_changed)
        if not written:
            return
        self.store.upsert_many([record for record, _, _ in written.values()])
        self._evict_beyond_capacity(set(written))
        for peer_id, (record, new, routes_changed) in written.items():
            self._persisted_seen[peer_id] = record.last_seen
            if new or routes_changed:
                event = "peer_discovered" if new else "peer_updated"
                source = record.source or "unknown"
                self.ctx.log.emit(event, peer_id=peer_id, source=source, transports=list(record.transports))
            if routes_changed:
                self._tell_routes(PeerRoutes.of(record))

    def _outcome(self, msg: EvolutionOutcome) -> None:
        rec = self.peers.get(msg.peer_id)
        if rec is None:
            return  # forgotten meanwhile: nothing to adjust
        rec = record_outcome(rec, msg.succeeded)
        self.store.upsert(rec)
        self.peers[rec.peer_id] = rec

    def _evict_beyond_capacity(self, keep: set[str]) -> None:
        """Over ``max_peers``: forget the peers seen longest ago (not those in ``keep``)."""
        excess = len(self.peers) - self.max_peers
        if excess <= 0:
            return
        candidates = sorted((rec.last_seen, peer_id) for peer_id, rec in self.peers.items() if peer_id not in keep)
        for last_seen, peer_id in candidates[:excess]:
            self.store.remove(peer_id)
            del self.peers[peer_id]
            self._persisted_seen.pop(peer_id, None)
            self.ctx.log.emit("peer_evicted", level="warning", peer_id=peer_id, last_seen=last_seen)
            self._tell_routes(PeerRoutes(peer_id, ()))

    def _forget(self, peer_id: str) -> None:
        if self.store.remove(peer_id):
            self.peers.pop(peer_id, None)
            self.ctx.log.emit("peer_forgotten", peer_id=peer_id)
            self._tell_routes(PeerRoutes(peer_id, ()))

    def _expire(self, now: float) -> None:
        for peer_id in self.store.expire(now, self.max_age):
            rec = self.peers.pop(peer_id, None)
            self.ctx.log.emit("peer_expired", peer_id=peer_id, last_seen=None if rec is None else rec.last_seen)
            self._tell_routes(PeerRoutes(peer_id, ()))

    def _rejected(self, source: str, reason: str) -> None:
        self.ctx.log.emit("sighting_rejected", level="warning", source=source, reason=reason)

    def _tell_routes(self, routes: PeerRoutes) -> None:
        if self.routes_to is not None:
            self._send(self.routes_to, routes)

    def _send(self, to: str, msg: object) -> None:
        try:
            self.tell(to, msg)
        except BusError as exc:
            # The retrier is down or full; it asks ListRoutes when it starts, so nothing is lost for long.
            self.ctx.log.emit("routes_undeliverable", level="warning", to=to, reason=str(exc))


# --- client API: callers never build the messages ---------------------------------------------------


def get_peer(client: Sender, peer_id: str, *, name: str = "registry", timeout: float = 5.0) -> PeerRecord | None:
    """What the registry knows of ``peer_id`` (None when unknown)."""
    reply = client.ask(name, GetPeer(peer_id), timeout=timeout)
    if not isinstance(reply, PeerReply):
        raise BusError(f"registry {name!r} answered GetPeer with {reply!r}")
    return None if reply.peer is None else reply.peer.record()


def list_peers(client: Sender, *, name: str = "registry", timeout: float = 5.0) -> list[PeerRecord]:
    """Every peer the registry knows, by id."""
    reply = client.ask(name, ListPeers(), timeout=timeout)
    if not isinstance(reply, PeerList):
        raise BusError(f"registry {name!r} answered ListPeers with {reply!r}")
    return [p.record() for p in reply.peers]


def find_suitable_peers(
    client: Sender, min_count: int, *, max_age: float | None = None, name: str = "registry", timeout: float = 5.0
) -> tuple[list[PeerRecord], bool]:
    """Every peer suitable for evolution, best first (no cap), and whether there are ``min_count``.

    Raises:
        ConfigError: ``min_count`` < 0 or ``max_age`` < 0 (checked here, so a bad
            argument never reaches, and crashes, the registry).
    """
    suitable_peers((), min_count, now=0.0, max_age=0.0 if max_age is None else max_age)  # validates only
    reply = client.ask(name, FindSuitablePeers(min_count, max_age), timeout=timeout)
    if not isinstance(reply, SuitablePeersReply):
        raise BusError(f"registry {name!r} answered FindSuitablePeers with {reply!r}")
    return [p.record() for p in reply.peers], reply.enough


def record_evolution_outcome(client: Sender, peer_id: str, succeeded: bool, *, name: str = "registry") -> None:
    """Tell the registry how an evolution with ``peer_id`` went (its trust moves)."""
    client.tell(name, EvolutionOutcome(peer_id, succeeded))
