"""A deterministic many-node BitChat mesh on :class:`~.radio.MemoryAir`, for multi-hop tests and the benchmark.

``SimMesh(n, edges, seed)`` builds n nodes, each a :class:`~.driver.MeshDriver`
with its own keys (derived from the seed) and its own seeded RNG, linked as
``edges`` says; :meth:`SimMesh.run` advances the manual clock. Everything is a
function of the seed: the same run gives the same frames in the same order.

Random geometric graphs (:func:`random_geometric`) are the usual model of
radios in a field: n points uniform in the unit square, linked when closer
than ``radius``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from nacl.bindings import crypto_scalarmult_base
from nacl.signing import SigningKey

from villagemesh.actors.bitchat.driver import MeshDriver, make_announce
from villagemesh.actors.bitchat.radio import MemoryAir, RadioEvent
from villagemesh.actors.bitchat.state import MeshConfig, dedup_key
from villagemesh.protocols.bitchat import MessageType, Packet, peer_id

__all__ = ["FLOODING", "SimMesh", "SimNode", "connected", "diameter", "random_geometric"]

FLOODING = MeshConfig(prune=False, dense_ttl=255, middle_ttl=255)
"""Plain flooding: every node relays every new packet once, TTL - 1, no pruning or caps (the baseline)."""


def random_geometric(n: int, radius: float, rng: random.Random) -> list[tuple[int, int]]:
    """Edges of a random geometric graph: n uniform points in the unit square, linked closer than ``radius``."""
    points = [(rng.random(), rng.random()) for _ in range(n)]
    return [(i, j) for i in range(n) for j in range(i + 1, n) if math.dist(points[i], points[j]) < radius]


def _adjacency(n: int, edges: Iterable[tuple[int, int]]) -> list[set[int]]:
    adjacent: list[set[int]] = [set() for _ in range(n)]
    for a, b in edges:
        adjacent[a].add(b)
        adjacent[b].add(a)
    return adjacent


def _hops_from(source: int, adjacent: list[set[int]]) -> dict[int, int]:
    hops = {source: 0}
    todo = deque([source])
    while todo:
        node = todo.popleft()
        for other in adjacent[node]:
            if other not in hops:
                hops[other] = hops[node] + 1
                todo.append(other)
    return hops


def connected(n: int, edges: Iterable[tuple[int, int]]) -> bool:
    """Whether every node reaches every other."""
    return len(_hops_from(0, _adjacency(n, edges))) == n


def diameter(n: int, edges: Iterable[tuple[int, int]]) -> int:
    """The longest shortest path, in hops (of a connected graph)."""
    adjacent = _adjacency(n, edges)
    return max(max(_hops_from(i, adjacent).values()) for i in range(n))


@dataclass
class SimNode:
    """One simulated node: keys, driver and what it received."""

    index: int
    signing_key: SigningKey
    noise_public: bytes
    driver: MeshDriver
    received: dict[bytes, float] = field(default_factory=dict)
    """dedup key -> when it was delivered here."""
    scheduled: float | None = None

    @property
    def peer_id(self) -> bytes:
        """This node's BitChat peer id."""
        return self.driver.me


class SimMesh:
    """N nodes on one in-memory air.

    Args:
        n: how many nodes.
        edges: which pairs are in range, by index.
        seed: everything random derives from it.
        config: every node's relay knobs.
        latency, mtu: the air's.
    """

    def __init__(
        self,
        n: int,
        edges: Iterable[tuple[int, int]],
        seed: int,
        config: MeshConfig | None = None,
        latency: float = 0.005,
        mtu: int = 512,
    ) -> None:
        self.air = MemoryAir(latency=latency, mtu=mtu)
        self.nodes: list[SimNode] = []
        for index in range(n):
            secret = hashlib.sha256(f"{seed}/{index}".encode()).digest()
            noise_public = crypto_scalarmult_base(hashlib.sha256(secret + b"noise").digest())
            me = peer_id(noise_public)
            received: dict[bytes, float] = {}
            rng = random.Random(f"{seed}/{index}/rng")
            driver = MeshDriver(me, self.air.radio(me), rng, on_deliver=self._recorder(received), config=config)
            self.nodes.append(SimNode(index, SigningKey(secret), noise_public, driver, received))
        for a, b in edges:
            self.air.set_link(self.nodes[a].peer_id, self.nodes[b].peer_id, True)
        for node in self.nodes:
            node.driver.radio.start(self._handler(node))
        self.air.run(self.air.now)

    def _recorder(self, received: dict[bytes, float]) -> Callable[[Packet, bytes], None]:
        def record(packet: Packet, link: bytes) -> None:
            received.setdefault(dedup_key(packet), self.air.now)

        return record

    def _handler(self, node: SimNode) -> Callable[[RadioEvent], None]:
        def handle(event: RadioEvent) -> None:
            node.driver.handle(event, self.air.now)
            self._kick(node)

        return handle

    def _kick(self, node: SimNode) -> None:
        deadline = node.driver.next_deadline()
        if deadline is None or (node.scheduled is not None and node.scheduled <= deadline):
            return
        node.scheduled = deadline

        def fire() -> None:
            node.scheduled = None
            node.driver.tick(self.air.now)
            self._kick(node)

        self.air.call_at(deadline, fire)

    def set_link(self, a: int, b: int, up: bool) -> None:
        """Put nodes ``a`` and ``b`` in or out of range now."""
        self.air.set_link(self.nodes[a].peer_id, self.nodes[b].peer_id, up)

    def announce_all(self, ttl: int = 1) -> None:
        """Every node announces itself and its neighbours (TTL 1: to its neighbours only), then the air settles."""
        for node in self.nodes:
            neighbours = self.air.neighbours(node.peer_id)
            packet = make_announce(node.signing_key, node.noise_public, f"n{node.index}", neighbours, self._timestamp())
            node.driver.originate(dataclasses.replace(packet, ttl=ttl), self.air.now)  # TTL is outside the signature
            self._kick(node)
        self.run()

    def send(self, source: int, payload: bytes, recipient: int | None = None, ttl: int = 7) -> bytes:
        """Node ``source`` originates a message (broadcast, or to ``recipient``); its dedup key."""
        node = self.nodes[source]
        packet = Packet(
            type=MessageType.MESSAGE,
            sender_id=node.peer_id,
            timestamp=self._timestamp(),
            payload=payload,
            ttl=ttl,
            recipient_id=None if recipient is None else self.nodes[recipient].peer_id,
        )
        node.driver.originate(packet, self.air.now)
        node.received.setdefault(dedup_key(packet), self.air.now)
        self._kick(node)
        return dedup_key(packet)

    def _timestamp(self) -> int:
        self._sequence = getattr(self, "_sequence", 0) + 1
        return int(self.air.now * 1000) * 1000 + self._sequence

    def run(self, until: float | None = None) -> int:
        """Advance the clock (see :meth:`MemoryAir.run`)."""
        return self.air.run(until)

    def reached(self, key: bytes) -> int:
        """How many nodes (the source included) have the message."""
        return sum(key in node.received for node in self.nodes)
