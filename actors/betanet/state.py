"""The BetaNet relay's pure decisions: addresses, the mix directory, routes, held packets, SURBs, epochs, cover.

Nothing here reads a clock or touches a socket: times come in as arguments
(wall seconds, as the actor reads them), randomness from a ``random.Random``
the actor owns (seeded in tests).

Rules:

1. **Addresses** are ``betanet://HOST:PORT/<mix public key, 64 hex>``: where a
   node's acceptor listens (mix links are Noise sessions on its SECURE route)
   and the X25519 key packets to it are built with. The mix key is derived
   from the node's static key (:func:`mix_secret`), so it survives restarts
   without a file of its own.
2. **Routes** have :data:`MIX_HOPS` mixes chosen at random among the known
   mixnodes other than this node and the recipient, then the recipient (or, for
   a reply block, this node). Fewer than :data:`MIX_HOPS` such mixnodes: no route
   (:class:`NoRoute`, a retryable failure: another transport may do).
3. **Delays** are the sender's: one draw of Exp(mean) per mix hop, capped at
   :data:`~villagemesh.protocols.sphinx.MAX_DELAY_MS` (a mean of 0 means none).
4. **Held packets** wait in a bounded queue ordered by due time; one beyond
   ``capacity`` is dropped and counted (a flood cannot grow a mix's memory).
5. **Epochs**: ``epoch_of(now)`` = whole ``epoch_seconds`` since 1970; a mix
   accepts the current epoch and the one before (a packet built just before a
   boundary, held by earlier hops, still passes); its replay caches keep those
   two epochs only.
6. **SURBs** received with a peer's messages are kept per peer by the message
   they came with, at most ``per_peer`` for at most ``peers`` peers (oldest
   forgotten first); an answer to a message takes that message's SURB (else the
   peer's newest), and each is used once. The keys of this node's own SURBs wait for their reply,
   at most ``capacity`` of them (oldest forgotten first: its reply is then
   refused, and the retrier resends).
7. **Cover**: loop and drop cover are Poisson processes (exponential gaps at a
   configured rate per second; rate 0: off). A loop sent and not back within
   ``loop_timeout`` seconds counts as lost (a sign of dropping mixes).
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from villagemesh.actors.registry.messages import RoutesList
from villagemesh.errors import ConfigError, ConnectError
from villagemesh.protocols.sphinx import MAX_DELAY_MS, Hop, Surb, SurbKeys
from villagemesh.protocols.sphinx.crypto import x25519_base

__all__ = [
    "MIX_HOPS",
    "SCHEME",
    "HeldQueue",
    "LoopTracker",
    "MixAddress",
    "Mixnode",
    "NoRoute",
    "PendingSurbs",
    "SurbStore",
    "accepted_epochs",
    "directory_from_routes",
    "epoch_of",
    "format_address",
    "mix_secret",
    "own_mixnode",
    "parse_address",
    "pick_route",
    "poisson_gap",
    "sender_delays",
]

SCHEME = "betanet"
MIX_HOPS = 3
"""Mixes on every route (the issue's floor): the sender's first mix knows the sender, the last one the recipient."""


class NoRoute(ConnectError):
    """Too few mixnodes are known for a route (retryable: nothing was sent)."""


@dataclass(frozen=True, slots=True)
class MixAddress:
    host: str
    port: int
    public_key: bytes


@dataclass(frozen=True, slots=True)
class Mixnode:
    """A node that relays: its node id, link address and mix key."""

    node_id: str
    host: str
    port: int
    public_key: bytes

    def hop(self) -> Hop:
        return Hop(bytes.fromhex(self.node_id), self.public_key)


def mix_secret(static_key: bytes) -> bytes:
    """The node's X25519 mix secret, derived from its static key (one key, one purpose each)."""
    if not isinstance(static_key, bytes) or len(static_key) != 32:
        raise ConfigError(f"a static key is 32 bytes, got {static_key!r:.40}")
    return hashlib.blake2b(static_key, person=b"vm-betanet-mix-1", digest_size=32).digest()


def format_address(host: str, port: int, public_key: bytes) -> str:
    """``betanet://host:port/<key hex>`` (IPv6 hosts in brackets)."""
    where = f"[{host}]" if ":" in host else host
    return f"{SCHEME}://{where}:{port}/{public_key.hex()}"


def parse_address(address: str) -> MixAddress:
    """The parts of a betanet address; :class:`ConfigError` naming it when it is not one."""
    prefix = f"{SCHEME}://"
    if not isinstance(address, str) or not address.startswith(prefix):
        raise ConfigError(f"not a betanet address: {address!r}")
    where, _, key_hex = address[len(prefix) :].partition("/")
    host, _, port_text = where.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port, key = int(port_text), bytes.fromhex(key_hex)
    except ValueError as exc:
        raise ConfigError(f"not a betanet address (port or key): {address!r}") from exc
    if not host or not 0 < port < 65536 or len(key) != 32:
        raise ConfigError(f"not a betanet address (host, port or 32-byte key): {address!r}")
    return MixAddress(host, port, key)


def directory_from_routes(routes: RoutesList, own_id: str) -> dict[str, Mixnode]:
    """Every peer with a betanet address, other than ``own_id``: its first well-formed address."""
    found: dict[str, Mixnode] = {}
    for peer in routes.routes:
        if peer.peer_id == own_id:
            continue
        for transport, addresses in peer.addresses:
            if transport != SCHEME:
                continue
            for address in addresses:
                try:
                    parsed = parse_address(address)
                except ConfigError:
                    continue  # a peer's malformed address is its problem; its other addresses may do
                found[peer.peer_id] = Mixnode(peer.peer_id, parsed.host, parsed.port, parsed.public_key)
                break
    return found


def pick_route(rng: random.Random, mixnodes: dict[str, Mixnode], exclude: Iterable[str]) -> list[Mixnode]:
    """:data:`MIX_HOPS` distinct mixes, none of them in ``exclude``; :class:`NoRoute` if too few are known."""
    skip = set(exclude)
    candidates = sorted((node for node_id, node in mixnodes.items() if node_id not in skip), key=lambda n: n.node_id)
    if len(candidates) < MIX_HOPS:
        raise NoRoute(f"betanet: {len(candidates)} usable mixnode(s) known, a route needs {MIX_HOPS}")
    return rng.sample(candidates, MIX_HOPS)


def sender_delays(rng: random.Random, mean_ms: float, hops: int) -> list[int]:
    """One Exp(mean) delay in ms per hop (capped), or zeros for a mean of 0."""
    if mean_ms <= 0:
        return [0] * hops
    return [min(MAX_DELAY_MS, round(rng.expovariate(1.0 / mean_ms))) for _ in range(hops)]


def poisson_gap(rng: random.Random, rate_per_s: float) -> float:
    """Seconds to the next event of a Poisson process of ``rate_per_s`` (> 0)."""
    return rng.expovariate(rate_per_s)


def epoch_of(now: float, epoch_seconds: float) -> int:
    """The epoch ``now`` (wall seconds) falls in."""
    return int(now // epoch_seconds)


def accepted_epochs(current: int) -> tuple[int, int]:
    """The epochs a mix accepts: the one before and the current one."""
    return current - 1, current


@dataclass(order=True)
class _Held:
    due: float
    seq: int
    next_node: str = field(compare=False)
    packet: bytes = field(compare=False)


class HeldQueue:
    """Packets waiting out their delay, earliest first, bounded."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ConfigError(f"a held queue holds at least one packet, got capacity {capacity!r}")
        self.capacity = capacity
        self._heap: list[_Held] = []
        self._seq = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, due: float, next_node: str, packet: bytes) -> bool:
        """Hold ``packet`` until ``due``; False (and counted) when the queue is full."""
        if len(self._heap) >= self.capacity:
            self.dropped += 1
            return False
        self._seq += 1
        heapq.heappush(self._heap, _Held(due, self._seq, next_node, packet))
        return True

    def pop_due(self, now: float) -> list[tuple[str, bytes]]:
        """Every packet whose time has come, earliest first."""
        out = []
        while self._heap and self._heap[0].due <= now:
            held = heapq.heappop(self._heap)
            out.append((held.next_node, held.packet))
        return out

    def next_due(self) -> float | None:
        return self._heap[0].due if self._heap else None


class SurbStore:
    """Reply blocks received from peers, by the message they came with; bounded per peer and in peers.

    An answer to a message (the retrier's ack names it in ``correlation_id``)
    takes that message's own SURB; any other answer takes the peer's newest.
    Each is used once. Past ``per_peer`` messages the oldest's go, past
    ``peers`` the peer heard from longest ago.
    """

    def __init__(self, *, per_peer: int = 256, peers: int = 1024) -> None:
        self.per_peer = per_peer
        self.peers = peers
        self._by_peer: OrderedDict[str, OrderedDict[bytes, list[Surb]]] = OrderedDict()

    def add(self, peer_id: str, message_id: bytes, surbs: tuple[Surb, ...]) -> None:
        if not surbs:
            return
        blocks = self._by_peer.pop(peer_id, None) or OrderedDict()
        blocks[message_id] = list(surbs)
        while len(blocks) > self.per_peer:
            blocks.popitem(last=False)
        self._by_peer[peer_id] = blocks
        while len(self._by_peer) > self.peers:
            self._by_peer.popitem(last=False)

    def take(self, peer_id: str, message_id: bytes | None = None) -> Surb | None:
        """The SURB that came with ``message_id`` if kept, else the peer's newest, else None; gone after this."""
        blocks = self._by_peer.get(peer_id)
        if not blocks:
            return None
        key = message_id if message_id is not None and message_id in blocks else next(reversed(blocks))
        kept = blocks[key]
        surb = kept.pop()
        if not kept:
            del blocks[key]
        if not blocks:
            del self._by_peer[peer_id]
        return surb

    def has(self, peer_id: str, message_id: bytes) -> bool:
        """Whether a SURB that came with ``message_id`` from ``peer_id`` is still here."""
        return message_id in self._by_peer.get(peer_id, {})

    def count(self, peer_id: str) -> int:
        return sum(map(len, self._by_peer.get(peer_id, {}).values()))


class PendingSurbs:
    """The keys of this node's own SURBs, by SURB id, until their reply comes (bounded, oldest forgotten)."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[bytes, SurbKeys] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, keys: SurbKeys) -> None:
        self._keys[keys.surb_id] = keys
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def take(self, surb_id: bytes) -> SurbKeys | None:
        return self._keys.pop(surb_id, None)


class LoopTracker:
    """Loop cover in flight: back in time, or lost."""

    def __init__(self, timeout: float, capacity: int = 4096) -> None:
        self.timeout = timeout
        self.capacity = capacity
        self._sent: OrderedDict[bytes, float] = OrderedDict()
        self.returned = 0
        self.lost = 0

    def sent(self, loop_id: bytes, now: float) -> None:
        self._sent[loop_id] = now
        while len(self._sent) > self.capacity:
            self._sent.popitem(last=False)
            self.lost += 1

    def back(self, loop_id: bytes) -> bool:
        """True if ``loop_id`` was one of ours still in flight."""
        if self._sent.pop(loop_id, None) is None:
            return False
        self.returned += 1
        return True

    def expire(self, now: float) -> int:
        """Count loops older than the timeout as lost; how many were."""
        gone = [loop_id for loop_id, at in self._sent.items() if now - at > self.timeout]
        for loop_id in gone:
            del self._sent[loop_id]
        self.lost += len(gone)
        return len(gone)


def own_mixnode(node_id: str, host: str, port: int, secret: bytes) -> Mixnode:
    """This node as a mixnode (the last hop of its own reply blocks and loops)."""
    return Mixnode(node_id, host, port, x25519_base(secret))
