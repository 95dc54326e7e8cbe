"""The BitChat mesh's pure relay logic: one node's view, bytes-free, clock and randomness given.

:class:`MeshState` is what one node decides about BitChat packets. Nothing here
reads a clock or draws its own random numbers: every call takes ``now``
(seconds on the caller's clock) and the jitter comes from the ``random.Random``
the caller injects (seeded in tests and benchmarks). The answers are actions
(:class:`Send`, :class:`Deliver`) for the caller to carry out, and
:meth:`MeshState.next_deadline` says when to call :meth:`MeshState.tick` again
(the actor schedules a timer message for it).

Rules, in the order a received packet meets them:

1. **Duplicates.** A packet is known by ``sender | timestamp | type |
   SHA-256(payload)[:4]`` (BitChat's ``MessageDeduplicator`` key). The seen-set
   is an LRU of ``seen_capacity`` keys, each forgotten after ``seen_max_age``
   seconds. A node marks its own packets seen before sending them.
2. **Delivery.** A new packet addressed to this node, or broadcast, is
   delivered once (:class:`Deliver`). One addressed to this node is not relayed.
3. **Relay.** A new packet with TTL > 1 is relayed after a jitter drawn from
   the injected RNG, growing with the node's degree (BitChat's 10-40 ms alone,
   60-150 ms up to 5 links, 80-180 ms up to 9, 100-220 ms beyond), with its
   TTL decremented and then capped: a node with ``dense_degree`` (6) links or
   more relays at most ``dense_ttl`` (5, never below 2), one with up to
   ``sparse_degree`` (2) links keeps the full TTL, others cap at ``middle_ttl``
   (6; 7 for announces). A directed packet whose recipient is a neighbour goes
   on that link only; everything else goes on every link but the one it came
   in on (split horizon) and but every neighbour known to have it already (rule 4).
4. **Cancelling.** While a relay waits, every copy heard tells the node who
   already has the packet: the sender of the copy and, if that sender announced
   its neighbours (announce TLV 0x04), those neighbours. Once all of this
   node's neighbours are covered, the relay is cancelled: it would tell nobody
   anything (neighbour-coverage pruning; on a connected graph with reliable
   links it loses no delivery, since a node stays silent only when all its
   neighbours heard a copy). As BitChat's simpler rule, a relay is also
   cancelled after ``cancel_after`` duplicates when the node has more than two
   links (None turns it off).
5. **Store and forward.** A directed packet for a peer that is not a neighbour
   is also kept (at most ``store_per_peer`` per peer, ``store_capacity`` in
   all, each for ``store_max_age`` seconds); when a link to that peer comes up,
   the kept packets go to it directly. The store is in memory only: a
   villagemesh envelope is already persisted by the retrier's outbox, which
   sends it again after a restart, so a second persistent copy here would only
   duplicate it; a BitChat app's private message is the app's to persist.

Neighbour lists are learned from verified announces (:meth:`MeshState.learn_neighbours`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import random
from collections import OrderedDict, deque
from collections.abc import Iterable, Set
from dataclasses import dataclass

from villagemesh.errors import ConfigError
from villagemesh.protocols.bitchat import BROADCAST, MessageType, Packet

__all__ = [
    "SCHEME",
    "TRANSPORT",
    "Action",
    "Counters",
    "Deliver",
    "MeshConfig",
    "MeshState",
    "Send",
    "dedup_key",
    "format_address",
    "parse_address",
]

TRANSPORT = "bitchat"
"""This transport's name (and its actor's bus name in a node)."""

_JITTER = ((2, 0.010, 0.040), (5, 0.060, 0.150), (9, 0.080, 0.180), (2**31, 0.100, 0.220))
"""(degree up to, min s, max s): BitChat's broadcast relay jitter, growing with degree."""


@dataclass(frozen=True)
class MeshConfig:
    """The relay's knobs; the defaults are BitChat's."""

    seen_capacity: int = 1000
    """Keys remembered (BitChat ``messageDedupMaxCount``)."""
    seen_max_age: float = 300.0
    """Seconds a key is remembered (``messageDedupMaxAgeSeconds``)."""
    dense_degree: int = 6
    """From this many links a node is in a dense neighbourhood."""
    dense_ttl: int = 5
    """The relayed TTL cap in a dense neighbourhood."""
    sparse_degree: int = 2
    """Up to this many links a node relays with the full TTL."""
    middle_ttl: int = 6
    """The relayed TTL cap between sparse and dense (announces: one more)."""
    prune: bool = True
    """Cancel a waiting relay once every neighbour is covered (False: plain flooding, the benchmark's baseline)."""
    cancel_after: int | None = None
    """Cancel a waiting relay after this many duplicates (with more than 2 links); None: coverage only."""
    store_capacity: int = 256
    """Packets kept for absent peers, in all."""
    store_per_peer: int = 32
    """Packets kept for one absent peer."""
    store_max_age: float = 600.0
    """Seconds a kept packet stays worth handing over."""
    announce_max_age: float = 240.0
    """Seconds an announce's timestamp may lie behind our wall clock (older: a replay, refused)."""
    announce_max_ahead: float = 60.0
    """Seconds it may lie ahead (clock skew between devices)."""

    def __post_init__(self) -> None:
        for name in (
            "seen_capacity",
            "dense_degree",
            "dense_ttl",
            "sparse_degree",
            "middle_ttl",
            "store_capacity",
            "store_per_peer",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"mesh config {name} must be an int >= 1, got {value!r}")
        if self.cancel_after is not None and (not isinstance(self.cancel_after, int) or self.cancel_after < 1):
            raise ConfigError(f"mesh config cancel_after must be None or an int >= 1, got {self.cancel_after!r}")
        for name in ("seen_max_age", "store_max_age", "announce_max_age", "announce_max_ahead"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"mesh config {name} must be > 0 seconds, got {getattr(self, name)!r}")
        if self.announce_max_age + self.announce_max_ahead > self.seen_max_age:
            # a replay inside the window must still find its key in the seen-set
            raise ConfigError(
                f"mesh config announce_max_age + announce_max_ahead ({self.announce_max_age} + "
                f"{self.announce_max_ahead} s) must not exceed seen_max_age ({self.seen_max_age} s)"
            )


@dataclass(frozen=True)
class Send:
    """Transmit ``packet`` on ``links`` (neighbour peer ids)."""

    packet: Packet
    links: tuple[bytes, ...]


@dataclass(frozen=True)
class Deliver:
    """``packet`` is for this node (addressed to it, or broadcast); ``link`` is the neighbour it came from."""

    packet: Packet
    link: bytes


Action = Send | Deliver


def dedup_key(packet: Packet) -> bytes:
    """BitChat's duplicate key: sender, timestamp, type and the first 4 bytes of SHA-256(payload)."""
    digest = hashlib.sha256(packet.payload).digest()[:4]
    return packet.sender_id + packet.timestamp.to_bytes(8, "big") + bytes([packet.type]) + digest


@dataclass
class _Relay:
    due: float
    packet: Packet
    ingress: bytes
    covered: set[bytes]
    duplicates: int = 0
    cancelled: bool = False


@dataclass
class _Stored:
    packet: Packet
    until: float


@dataclass
class Counters:
    """What a node did, for status and benchmarks."""

    received: int = 0
    duplicates: int = 0
    delivered: int = 0
    relays_scheduled: int = 0
    relays_sent: int = 0
    relays_cancelled: int = 0
    stored: int = 0
    forwarded_from_store: int = 0
    transmissions: int = 0
    """Link writes: a Send on 3 links counts 3."""


class MeshState:
    """One node's relay decisions.

    Args:
        me: this node's BitChat peer id.
        rng: where jitter comes from (inject a seeded ``random.Random``).
        config: the knobs.
    """

    def __init__(self, me: bytes, rng: random.Random, config: MeshConfig | None = None) -> None:
        self.me = me
        self.rng = rng
        self.config = config or MeshConfig()
        self.links: set[bytes] = set()
        self.counters = Counters()
        self._neighbours: dict[bytes, frozenset[bytes]] = {}
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._relays: dict[bytes, _Relay] = {}
        self._queue: list[tuple[float, int, bytes]] = []
        self._sequence = 0
        self._store: dict[bytes, deque[_Stored]] = {}
        self._stored = 0

    # ------------------------------------------------------------------------ links and neighbours

    def link_up(self, peer: bytes, now: float) -> list[Action]:
        """A link to ``peer`` came up: hand it what was kept for it."""
        self.links.add(peer)
        kept = self._store.pop(peer, deque())
        self._stored -= len(kept)
        out: list[Action] = [self._send(item.packet, (peer,)) for item in kept if item.until > now]
        self.counters.forwarded_from_store += len(out)
        return out

    def link_down(self, peer: bytes) -> None:
        """The link to ``peer`` went down."""
        self.links.discard(peer)

    def learn_neighbours(self, peer: bytes, neighbours: Iterable[bytes]) -> None:
        """``peer`` announced these direct neighbours (from a verified announce)."""
        self._neighbours[peer] = frozenset(neighbours)

    def _covered_by(self, peer: bytes) -> set[bytes]:
        return {peer} | self._neighbours.get(peer, frozenset())

    # ------------------------------------------------------------------------ packets

    def originate(self, packet: Packet, now: float) -> list[Action]:
        """Send our own packet: marked seen, then out on every link (or the recipient's, or kept for it)."""
        self._remember(dedup_key(packet), now)
        return self._route(packet, skip=frozenset(), now=now)

    def mark_seen(self, packet: Packet, now: float) -> None:
        """Remember ``packet`` as seen without sending it (our own fragments, sent by the caller)."""
        self._remember(dedup_key(packet), now)

    def receive(self, packet: Packet, link: bytes, now: float) -> list[Action]:
        """A packet came in on the link from neighbour ``link``."""
        self.counters.received += 1
        key = dedup_key(packet)
        if key in self._seen:
            self.counters.duplicates += 1
            relay = self._relays.get(key)
            if relay is not None and not relay.cancelled:
                relay.duplicates += 1
                relay.covered |= self._covered_by(link)
                self._maybe_cancel(key, relay)
            return []
        self._remember(key, now)
        out: list[Action] = []
        to_me = packet.recipient_id == self.me
        if to_me or packet.is_broadcast:
            self.counters.delivered += 1
            out.append(Deliver(packet, link))
        if to_me or packet.sender_id == self.me or packet.ttl <= 1:
            return out
        if packet.type == MessageType.REQUEST_SYNC:
            return out  # link-local, never relayed
        relayed = dataclasses.replace(packet, ttl=self._relay_ttl(packet))
        covered = self._covered_by(link)
        relay = _Relay(now + self._jitter(covered), relayed, link, covered)
        self.counters.relays_scheduled += 1
        self._relays[key] = relay
        heapq.heappush(self._queue, (relay.due, self._sequence, key))
        self._sequence += 1
        self._maybe_cancel(key, relay)
        return out

    def _maybe_cancel(self, key: bytes, relay: _Relay) -> None:
        covered = self.config.prune and self.links <= relay.covered
        counted = (
            self.config.cancel_after is not None
            and relay.duplicates >= self.config.cancel_after
            and len(self.links) > 2
        )
        directed = not relay.packet.is_broadcast and relay.packet.recipient_id in relay.covered
        if covered or counted or directed:
            relay.cancelled = True
            self.counters.relays_cancelled += 1
            del self._relays[key]

    def tick(self, now: float) -> list[Action]:
        """Relays that are due; forgets old seen keys and kept packets."""
        out: list[Action] = []
        while self._queue and self._queue[0][0] <= now:
            _, _, key = heapq.heappop(self._queue)
            relay = self._relays.pop(key, None)
            if relay is None:
                continue  # cancelled
            self.counters.relays_sent += 1
            out.extend(self._route(relay.packet, skip=relay.covered if self.config.prune else {relay.ingress}, now=now))
        self._forget(now)
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`tick` has something to do next (a relay falls due), or None."""
        while self._queue and self._queue[0][2] not in self._relays:
            heapq.heappop(self._queue)
        return self._queue[0][0] if self._queue else None

    @property
    def pending_relays(self) -> int:
        """Relays waiting for their jitter."""
        return len(self._relays)

    @property
    def stored(self) -> int:
        """Packets kept for absent peers."""
        return self._stored

    # ------------------------------------------------------------------------ helpers

    def _route(self, packet: Packet, skip: Set[bytes], now: float) -> list[Action]:
        recipient = packet.recipient_id
        if recipient is not None and recipient != BROADCAST:
            if recipient in self.links:
                return [self._send(packet, (recipient,))]
            self._keep(packet, recipient, now)
        links = tuple(sorted(self.links - skip))
        return [self._send(packet, links)] if links else []

    def _send(self, packet: Packet, links: tuple[bytes, ...]) -> Send:
        self.counters.transmissions += len(links)
        return Send(packet, links)

    def _keep(self, packet: Packet, recipient: bytes, now: float) -> None:
        kept = self._store.setdefault(recipient, deque())
        if len(kept) >= self.config.store_per_peer:
            kept.popleft()
            self._stored -= 1
        if self._stored >= self.config.store_capacity:
            self._drop_oldest_stored()
        kept.append(_Stored(packet, now + self.config.store_max_age))
        self._stored += 1
        self.counters.stored += 1

    def _drop_oldest_stored(self) -> None:
        peer = min(self._store, key=lambda p: self._store[p][0].until if self._store[p] else float("inf"))
        self._store[peer].popleft()
        self._stored -= 1

    def _relay_ttl(self, packet: Packet) -> int:
        ttl = packet.ttl - 1
        degree = len(self.links)
        if degree >= self.config.dense_degree:
            return min(ttl, max(self.config.dense_ttl, 2))
        if degree <= self.config.sparse_degree:
            return ttl
        cap = self.config.middle_ttl + (1 if packet.type == MessageType.ANNOUNCE else 0)
        return min(ttl, cap)

    def _jitter(self, covered: set[bytes]) -> float:
        degree = len(self.links)
        low, high = next((low, high) for top, low, high in _JITTER if degree <= top)
        if not self.config.prune or not degree:
            return self.rng.uniform(low, high)
        # Half random, half how much is covered already: who can tell more neighbours goes first.
        share = len(self.links & covered) / degree
        return low + (high - low) * (0.5 * self.rng.random() + 0.5 * share)

    def _remember(self, key: bytes, now: float) -> None:
        self._seen[key] = now
        self._seen.move_to_end(key)
        while len(self._seen) > self.config.seen_capacity:
            self._seen.popitem(last=False)

    def _forget(self, now: float) -> None:
        horizon = now - self.config.seen_max_age
        while self._seen:
            key, when = next(iter(self._seen.items()))
            if when > horizon:
                break
            del self._seen[key]
        for peer in list(self._store):
            kept = self._store[peer]
            while kept and kept[0].until <= now:
                kept.popleft()
                self._stored -= 1
            if not kept:
                del self._store[peer]


# ---------------------------------------------------------------------------- addresses

SCHEME = "bitchat://"
"""A BitChat address: ``bitchat://<peer id, 16 hex digits>:0`` (what announces carry; port 0: a radio has none,
but a discovery address is ``transport://host:port``)."""


def format_address(peer: bytes) -> str:
    """``bitchat://<peer id hex>:0``."""
    return f"{SCHEME}{peer.hex()}:0"


def parse_address(address: str) -> bytes:
    """The peer id of a BitChat address.

    Raises:
        ConfigError: not ``bitchat://``, 16 hex digits and an optional ``:0``.
    """
    text = address.removeprefix(SCHEME).removesuffix(":0") if address.startswith(SCHEME) else None
    try:
        peer = bytes.fromhex(text) if text is not None and len(text) == 16 else None
    except ValueError:
        peer = None
    if peer is None:
        raise ConfigError(f"not a BitChat address (bitchat:// and 16 hex digits): {address!r}")
    return peer
