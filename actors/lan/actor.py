"""The LAN discovery actor: beacons, the TCP discovery responder, and probes, on one loop thread.

Thin by design (the logic lives in :mod:`.state`, :mod:`.beacon`, :mod:`.tcp`)::

    UDP beacon (loop) ──on_peer──▶ post ──▶ on_loop_message ──bus──▶ peers_to: PeerAnnounced
    acceptor ──ConnectionHandedOff(fd, route=discovery)──▶ adopt_handed_off ──▶ DiscoveryResponder
    anyone ──ProbePeer──▶ run_on_loop(probe) ──then──▶ reply_to: PeerProbed | ProbeFailed
    sweeper ──Discover──▶ probe bootstrap + pull a few known peers ──then──▶ reply_to: Discovered
    learned new peers ──▶ pull some of them at once ──then──▶ peers_to: Sighted

Peer exchange. Every verified announce or response this node hears (beacon,
probe, exchange) goes into a :class:`~.state.PeerBook`; the responder passes
the newest of them on to whoever asks (``PEER_LIST_REQUEST``). A round's
probes ask for that list, and so does a *pull*: a probe of a peer from the book.
Each round pulls :data:`ROUND_PULLS` random known peers (gossip: views heal
and stay fresh), and an exchange that taught us new peers pulls up to
:data:`PULL_FANOUT` of them at once, so news spreads in round trips, not rounds.
No peer is pulled more than once per :data:`PULL_EVERY_S` outside the rounds,
so the burst that follows a start is bounded by the number of peers. Relayed
entries are verified here before they reach the book or the registry, and an
entry not newer than the book's costs no signature check.

Discovery is symmetric: a peer whose request the responder answered is
probed back (at most every :data:`PROBE_BACK_EVERY_S`), and its signed
response goes to ``peers_to`` as a ``Sighted``; so a node that found us can
be answered (acks need a route back) without being in our bootstrap list.

It is also a discovery source for the sweeper (the transport contract's
``Discover``): each round probes every ``bootstrap`` address concurrently on
the loop, each probe bounded by the round's timeout, and answers one
``Discovered`` with a ``Sighting`` per verified response and an error string
per address that failed. A failing address never holds up the others.

Config (``ctx.config``): ``identity`` (:class:`~.identity.Identity`, required),
``beacon`` (:class:`~.beacon.BeaconConfig`), ``beacons`` (False: no UDP
beacons at all, default True), ``bootstrap`` (``host:port`` acceptor addresses
to probe each round), ``exchange`` (False: neither ask for nor pull peer
lists, default True), ``peers_to`` (actor name for verified announces;
without it they are counted only).

Log events (besides the beacon's and responder's): ``exchange_rejected``
(source, node_id, reason) for a relayed entry that failed verification,
``pull_failed`` (peer_id, address, reason).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

from villagemesh.actors.acceptor.loopactor import LOOP_CALL_TIMEOUT_S, LoopActor
from villagemesh.actors.acceptor.messages import ConnectionHandedOff
from villagemesh.actors.bus import Sender
from villagemesh.actors.lan.beacon import BeaconConfig, BeaconEndpoint
from villagemesh.actors.lan.identity import Identity
from villagemesh.actors.lan.messages import GetLanStatus, LanStatus, PeerAnnounced, PeerProbed, ProbeFailed, ProbePeer
from villagemesh.actors.lan.state import PeerBook, pick
from villagemesh.actors.lan.tcp import DiscoveryResponder, Probed, SignedResponses, probe
from villagemesh.actors.sweeper.messages import Sighted
from villagemesh.actors.transport import Discover, Discovered, Sighting
from villagemesh.errors import BusError, ConfigError, ProtocolError, RemoteProtocolError, VillageMeshError
from villagemesh.protocols.discovery import (
    MAX_PEER_LIST,
    Announce,
    DiscoveryConnection,
    DiscoveryRequest,
    DiscoveryResponse,
    RelayedPeer,
    decode_discovery,
    peer_list,
)

__all__ = ["TRANSPORT", "LanActor", "lan_status", "parse_host_port", "probe_peer"]

TRANSPORT = "lan"
"""The name this discovery source reports its sightings under."""


PROBE_BACK_EVERY_S = 30.0
"""A peer that probes us is probed back at most this often (a probe storm costs one probe each)."""

PROBE_BACK_TIMEOUT_S = 3.0
"""Seconds a probe back may take."""

ANSWER_DELAY_S = 0.05
"""After hearing a new node's beacon, wait this long (gathering other newcomers) and beacon once."""


PULL_FANOUT = 2
"""Peers pulled at once when an exchange taught us new ones."""

ROUND_PULLS = 2
"""Random known peers pulled each discovery round, besides the bootstrap addresses."""

PULL_EVERY_S = 10.0
"""Outside the rounds, a peer is pulled at most this often."""

PULL_TIMEOUT_S = 3.0
"""Seconds a pull (probe + peer list) may take."""

GOSSIP_MIN_S = 0.05
"""While this node is learning new peers, it pulls a random known peer this often..."""

GOSSIP_MAX_S = 1.6
"""...doubling the delay after each gossip tick that taught nothing, and stopping beyond this
(until the next new peer): a burst of pulls while the network is converging, a handful after."""

_PULLED_LATELY_S = 0.5
"""Seconds a pull (probe + peer list) may take."""

PROBE_BACK_MEMORY = 4096
"""Peers remembered as recently probed back (oldest forgotten first): bounded memory."""


class _Gossip:
    """Timer: a gossip tick."""


def _tcp_target(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``ws://`` or ``tcp://`` address (the acceptor's port), else None."""
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in ("ws", "tcp"):
        return None
    host, colon, port = rest.split("/", 1)[0].rpartition(":")
    return (host, int(port)) if colon and host and port.isdigit() else None


def parse_host_port(entry: str) -> tuple[str, int]:
    """``(host, port)`` of a ``host:port`` bootstrap entry; ConfigError naming it otherwise."""
    host, sep, port = str(entry).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"bootstrap entries are 'host:port', got {entry!r}")
    return host, int(port)


class LanActor(LoopActor):
    """Finds peers on the local network and answers those who ask."""

    def on_start(self) -> None:
        config = self.ctx.config
        identity = config.get("identity")
        if not isinstance(identity, Identity):
            raise ConfigError(f"the LAN actor needs config['identity'] (an Identity), got {identity!r}")
        self.identity = identity
        self.peers_to: str | None = config.get("peers_to")
        self.responder_counts: Counter[str] = Counter()
        self.bootstrap = tuple(parse_host_port(entry) for entry in config.get("bootstrap", ()))
        self.probed_back: dict[str, float] = {}
        self.heard: dict[str, None] = {}
        """Node ids whose beacons we have heard (oldest forgotten first)."""
        self.answer_pending = False
        self.exchange = bool(config.get("exchange", True))
        self.book = PeerBook(identity.node_id)
        self.listing: tuple[RelayedPeer, ...] = ()
        """What the responder passes on (read on the loop thread; replaced whole, never mutated)."""
        self._list_cache: tuple[tuple[RelayedPeer, ...] | None, int, bytes] = (None, 0, b"")
        """(listing, limit, framed PEER_LIST): encoded once per listing, on the loop thread."""
        self.pulled: dict[str, float] = {}
        """Node id -> when we last pulled it (oldest forgotten first)."""
        self.responses = SignedResponses(identity)
        self.learned = False
        """A new peer reached the book since the last gossip tick."""
        self.gossip_delay: float | None = None
        """Seconds until the next gossip tick; None when gossip is idle."""
        self.exchange_counts: Counter[str] = Counter()
        self.beacon: BeaconEndpoint | None = None
        self.start_io()
        if config.get("beacons", True):
            self.beacon = BeaconEndpoint(identity, self._heard, config.get("beacon") or BeaconConfig(), log=self.io_log)
            self.io_loop.call(self.beacon.start(), LOOP_CALL_TIMEOUT_S)

    async def io_shutdown(self) -> None:
        """Stop beaconing and close the UDP socket."""
        beacon = getattr(self, "beacon", None)
        if beacon is not None:
            await beacon.close()

    def _heard(self, announce: Announce, body: bytes, source: tuple[str, int]) -> None:
        # On the loop thread. A node never heard before has not heard us either, most
        # likely (it just started): answer with our own beacon soon, once for all the
        # newcomers of that moment (mDNS-style), instead of at our next scheduled one.
        if announce.node_id not in self.heard and announce.node_id != self.identity.node_id:
            if len(self.heard) >= PROBE_BACK_MEMORY:
                self.heard.pop(next(iter(self.heard)))
            self.heard[announce.node_id] = None
            if not self.answer_pending and self.beacon is not None:
                self.answer_pending = True
                asyncio.get_running_loop().call_later(ANSWER_DELAY_S, self._answer)
        self.post((announce, body, source))

    def _answer(self) -> None:
        self.answer_pending = False
        if self.beacon is not None:
            self.beacon.send_now()

    def _requested(self, request: DiscoveryRequest) -> None:
        # On the loop thread: a peer asked who we are; the actor decides whether to ask back.
        self.post(request)

    def on_loop_message(self, message: Any) -> None:
        """A verified announce heard by the beacon, or a discovery request we answered."""
        if isinstance(message, DiscoveryRequest):
            self._probe_back(message)
            return
        announce, body, (host, port) = message
        self._remember(RelayedPeer(announce.node_id, announce.timestamp, body), announce.addresses)
        self._publish()
        if self.peers_to is not None:
            heard = PeerAnnounced(announce.node_id, announce.addresses, f"{host}:{port}", body)
            self._tell(self.peers_to, heard)

    def _probe_back(self, request: DiscoveryRequest) -> None:
        """Discovery is symmetric: whoever probes us is probed back, so that we can reach it too
        (an end-to-end ack needs a route back). Its request is unsigned, so we learn nothing
        from it but where to ask; the peer's signed response is what reaches the registry."""
        now = time.monotonic()
        if request.node_id == self.identity.node_id or self.peers_to is None:
            return
        if now - self.probed_back.get(request.node_id, -PROBE_BACK_EVERY_S) < PROBE_BACK_EVERY_S:
            return
        target = next((_tcp_target(a) for a in request.addresses if _tcp_target(a) is not None), None)
        if target is None:
            return
        if len(self.probed_back) >= PROBE_BACK_MEMORY:
            self.probed_back.pop(next(iter(self.probed_back)))
        self.probed_back[request.node_id] = now
        host, port = target

        def then(result: Probed | None, error: BaseException | None) -> None:
            if result is not None:
                sighting = self._sighted(result)
                self._publish()
                assert self.peers_to is not None
                self._tell(self.peers_to, Sighted((sighting,)))
            elif isinstance(error, VillageMeshError | asyncio.CancelledError):
                # Forget the attempt, so the peer's next request (its next round) tries again.
                self.probed_back.pop(request.node_id, None)
                self.io_log.info(
                    "probe_back_failed", peer_id=request.node_id, address=f"{host}:{port}", reason=str(error)
                )
            else:
                assert error is not None
                raise error

        self.run_on_loop(probe(host, port, PROBE_BACK_TIMEOUT_S, request=self._request()), then)

    # -- bus messages -------------------------------------------------------------------------------

    def handle(self, msg: Any) -> Any:
        """:class:`ConnectionHandedOff` (discovery), :class:`ProbePeer`, :class:`GetLanStatus`."""
        if isinstance(msg, ConnectionHandedOff):
            self.adopt_handed_off(
                msg,
                lambda: DiscoveryResponder(
                    self.identity,
                    counts=self.responder_counts,
                    log=self.io_log,
                    on_request=self._requested,
                    responses=self.responses,
                    peer_lists=self._framed_list,
                ),
            )
            return None
        if isinstance(msg, ProbePeer):
            self._start_probe(msg)
            return None
        if isinstance(msg, Discover):
            self._start_round(msg)
            return None
        if isinstance(msg, _Gossip):
            self._gossip()
            return None
        if isinstance(msg, GetLanStatus):
            status: LanStatus = self.io_loop.call(self._statistics(), LOOP_CALL_TIMEOUT_S)
            return LanStatus(status.mode, status.beacon, status.responder, dict(self.exchange_counts))
        return super().handle(msg)

    def _start_round(self, request: Discover) -> None:
        asking = self._request()
        want = MAX_PEER_LIST if self.exchange else 0
        # Each probe gets most of the round's time, so its answer (or error) beats the deadline.
        per_probe = max(0.05, request.timeout * 0.8)
        targets = list(self.bootstrap)
        if self.exchange:
            known = self.book.targets()
            for node_id in pick(sorted(known), ROUND_PULLS, random.randrange):
                if known[node_id] not in targets:
                    targets.append(known[node_id])
                    self._note_pulled(node_id)

        async def one(host: str, port: int) -> Probed | str:
            try:
                return await probe(host, port, per_probe, request=asking, want_peers=want)
            except VillageMeshError as exc:
                return f"{host}:{port}: {type(exc).__name__}: {exc}"

        async def everyone() -> list[Probed | str]:
            return list(await asyncio.gather(*(one(h, p) for h, p in targets)))

        def then(results: list[Probed | str] | None, error: BaseException | None) -> None:
            if error is not None:
                raise error  # probes report their own failures: anything else is a bug
            found: list[Sighting] = []
            new: list[str] = []
            for result in results or ():
                if isinstance(result, Probed):
                    found.append(self._sighted(result))
                    found.extend(self._learn(result, new))
            self._publish()
            errors = tuple(r for r in results or () if isinstance(r, str))
            self._tell(request.reply_to, Discovered(request.round, TRANSPORT, tuple(found), errors))
            self._pull_some(new)

        self.run_on_loop(everyone(), then)

    # -- peer exchange ------------------------------------------------------------------------------

    def _framed_list(self, limit: int) -> bytes:
        """The framed PEER_LIST of the published listing (on the loop thread: never the book)."""
        listing, (cached, cached_limit, framed) = self.listing, self._list_cache
        if cached is not listing or cached_limit != limit:
            framed = DiscoveryConnection().send(peer_list(listing, limit))
            self._list_cache = (listing, limit, framed)
        return framed

    def _remember(self, peer: RelayedPeer, addresses: tuple[str, ...]) -> bool:
        """Into the book; True (and gossip woken) if the peer is new to it."""
        target = next((t for t in map(_tcp_target, addresses) if t is not None), None)
        if not self.book.add(peer, target):
            return False
        self.learned = True
        if self.gossip_delay is None and self.exchange:
            self.gossip_delay = GOSSIP_MIN_S
            self.schedule(GOSSIP_MIN_S, _Gossip())
        return True

    def _gossip(self) -> None:
        """A gossip tick: pull one random known peer, then tick again sooner or later (or rest)."""
        assert self.gossip_delay is not None
        delay = GOSSIP_MIN_S if self.learned else self.gossip_delay * 2
        self.learned = False
        if delay > GOSSIP_MAX_S:
            self.gossip_delay = None
            return
        now = time.monotonic()
        known = self.book.targets()
        idle = sorted(n for n in known if now - self.pulled.get(n, -_PULLED_LATELY_S) >= _PULLED_LATELY_S)
        for node_id in pick(idle, 1, random.randrange):
            self._note_pulled(node_id)
            self._pull(node_id, *known[node_id])
        self.gossip_delay = delay
        self.schedule(delay, _Gossip())

    def _publish(self) -> None:
        """Refresh what the responder passes on (an asker finds itself in it and skips it)."""
        self.listing = self.book.relayable(self.identity.clock(), MAX_PEER_LIST)

    def _sighted(self, probed: Probed) -> Sighting:
        response = probed.response
        self._remember(RelayedPeer(response.node_id, response.timestamp, probed.body), response.addresses)
        return Sighting(TRANSPORT, probed.body.decode(), probed.latency_ms)

    def _learn(self, probed: Probed, new: list[str]) -> list[Sighting]:
        """Verify what a peer passed on that is news to the book; its sightings (new node ids go to ``new``)."""
        source = probed.response.node_id
        found: list[Sighting] = []
        for peer in probed.peers:
            if self.book.knows(peer.node_id, peer.timestamp):
                self.exchange_counts["known"] += 1
                continue
            try:
                event = decode_discovery(peer.body)
                if not isinstance(event, Announce | DiscoveryResponse):
                    raise RemoteProtocolError(f"entry claiming {peer.node_id} is a {type(event).__name__}")
                if (event.node_id, event.timestamp) != (peer.node_id, peer.timestamp):
                    raise RemoteProtocolError(
                        f"entry claims {peer.node_id} at {peer.timestamp}, is {event.node_id} at {event.timestamp}"
                    )
            except ProtocolError as exc:
                self.exchange_counts["rejected"] += 1
                self.io_log.warning("exchange_rejected", source=source, node_id=peer.node_id, reason=str(exc))
                continue
            self.exchange_counts["learned"] += 1
            if self._remember(peer, event.addresses):
                new.append(peer.node_id)
            found.append(Sighting(TRANSPORT, peer.body.decode(), None))
        return found

    def _note_pulled(self, node_id: str) -> None:
        if len(self.pulled) >= PROBE_BACK_MEMORY:
            self.pulled.pop(next(iter(self.pulled)))
        self.pulled.pop(node_id, None)
        self.pulled[node_id] = time.monotonic()

    def _pull_some(self, new: list[str]) -> None:
        """Pull up to PULL_FANOUT of the peers just learned (none pulled under PULL_EVERY_S ago)."""
        if not new or not self.exchange:
            return
        now = time.monotonic()
        fresh = [n for n in new if now - self.pulled.get(n, -PULL_EVERY_S) >= PULL_EVERY_S]
        targets = self.book.targets(pick(fresh, PULL_FANOUT, random.randrange))
        for node_id, (host, port) in targets.items():
            self._note_pulled(node_id)
            self._pull(node_id, host, port)

    def _pull(self, node_id: str, host: str, port: int) -> None:
        def then(result: Probed | None, error: BaseException | None) -> None:
            if result is not None:
                new: list[str] = []
                found = [self._sighted(result), *self._learn(result, new)]
                self._publish()
                if self.peers_to is not None:
                    self._tell(self.peers_to, Sighted(tuple(found)))
                self._pull_some(new)
            elif isinstance(error, VillageMeshError | asyncio.CancelledError):
                self.exchange_counts["pull_failed"] += 1
                self.io_log.info("pull_failed", peer_id=node_id, address=f"{host}:{port}", reason=str(error))
            else:
                assert error is not None
                raise error

        asking = self._request()
        self.run_on_loop(probe(host, port, PULL_TIMEOUT_S, request=asking, want_peers=MAX_PEER_LIST), then)

    def _request(self) -> DiscoveryRequest:
        return DiscoveryRequest(
            node_id=self.identity.node_id,
            addresses=self.identity.addresses,
            capabilities=self.identity.capabilities,
            timestamp=self.identity.clock(),
        )

    def _start_probe(self, request: ProbePeer) -> None:
        asking = self._request()

        def then(result: Probed | None, error: BaseException | None) -> None:
            outcome: object
            if result is not None:
                sighting = self._sighted(result)
                self._publish()
                outcome = PeerProbed(
                    request.host,
                    request.port,
                    result.response.node_id,
                    result.response.addresses,
                    result.latency_ms,
                    sighting.announce.encode(),
                )
            elif isinstance(error, VillageMeshError | asyncio.CancelledError):
                outcome = ProbeFailed(request.host, request.port, type(error).__name__, str(error))
            else:
                assert error is not None
                raise error  # not a network failure: a bug, let the supervisor see it
            self._tell(request.reply_to, outcome)

        self.run_on_loop(probe(request.host, request.port, request.timeout, request=asking), then)

    def _tell(self, to: str, msg: object) -> None:
        try:
            self.tell(to, msg)
        except BusError as exc:
            self.io_log.warning("lan_outcome_undeliverable", to=to, reason=str(exc))

    async def _statistics(self) -> LanStatus:
        if self.beacon is None:
            return LanStatus("off", {}, dict(self.responder_counts), {})
        return LanStatus(self.beacon.mode, dict(self.beacon.counts), dict(self.responder_counts), {})


def probe_peer(client: Sender, host: str, port: int, *, reply_to: str, name: str = "lan", timeout: float = 5.0) -> None:
    """Ask the LAN actor to probe ``host:port``; a PeerProbed or ProbeFailed is told to ``reply_to``."""
    client.tell(name, ProbePeer(host, port, timeout, reply_to))


def lan_status(client: Sender, name: str = "lan", *, timeout: float = 5.0) -> LanStatus:
    """The LAN actor's beacon mode and counters."""
    reply = client.ask(name, GetLanStatus(), timeout=timeout)
    if not isinstance(reply, LanStatus):
        raise BusError(f"LAN actor {name!r} answered {reply!r}")
    return reply
