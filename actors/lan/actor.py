"""The LAN discovery actor: beacons, the TCP discovery responder, and probes, on one loop thread.

Thin by design (the logic lives in :mod:`.state`, :mod:`.beacon`, :mod:`.tcp`)::

    UDP beacon (loop) ──on_peer──▶ post ──▶ on_loop_message ──bus──▶ peers_to: PeerAnnounced
    acceptor ──ConnectionHandedOff(fd, route=discovery)──▶ adopt_handed_off ──▶ DiscoveryResponder
    anyone ──ProbePeer──▶ run_on_loop(probe) ──then──▶ reply_to: PeerProbed | ProbeFailed
    sweeper ──Discover──▶ exchange with bootstrap + a few known peers ──then──▶ reply_to: Discovered
    gossip tick (timer, while learning) ──▶ exchange with a random known peer ──then──▶ peers_to: Sighted
    a prober that introduced itself / pushed a list ──▶ book ──▶ peers_to: Sighted

Peer exchange (push-pull). Every verified announce or response this node hears
(beacon, probe, exchange) goes into a :class:`~.state.PeerBook`. An exchange
with a peer is one connection: we write our signed announce (it learns us, no
probe back needed), the changes of our book it has not had from us (a pushed
PEER_LIST), and our requests; it answers with its response and the changes of
its book after our cursor. So both sides end up with the union, and the lists
are deltas (nearly empty between peers that exchanged before). Each sweep
round exchanges with every bootstrap address and :data:`ROUND_PULLS` random
known peers; besides, while the book is growing by exchange (a peer heard by its own
beacon is on our link and needs no gossip), a gossip tick every
:data:`GOSSIP_MIN_S` exchanges with one random known peer, backing off to
:data:`GOSSIP_MAX_S` and resting once nothing new comes: news spreads in a
few ticks, not rounds, and an idle network costs only its rounds. Relayed
entries are verified here before they reach the book or the registry, an
entry not clearly newer than the book's costs no signature check, and the
registry hears of a peer when it is new, changed, or every
:data:`REGISTRY_REFRESH_S`.

Discovery is symmetric: a peer whose request the responder answered is
probed back (at most every :data:`PROBE_BACK_EVERY_S`), and its signed
response goes to ``peers_to`` as a ``Sighted``; so a node that found us can
be answered (acks need a route back) without being in our bootstrap list.

It is also a discovery source for the sweeper (the transport contract's
``Discover``): each round probes the ``bootstrap`` addresses not exchanged with
in the last :data:`BOOTSTRAP_REFRESH_S` (at most :data:`ROUND_BOOTSTRAP_MAX`,
the least recently tried first) concurrently on the loop, each probe
bounded by the round's timeout, and answers one ``Discovered`` with a
``Sighting`` per verified response and an error string per address that failed.
A failing address never holds up the others.

Config (``ctx.config``): ``identity`` (:class:`~.identity.Identity`, required),
``beacon`` (:class:`~.beacon.BeaconConfig`), ``beacons`` (False: no UDP
beacons at all, default True), ``bootstrap`` (``host:port`` acceptor addresses
to probe each round), ``exchange`` (False: neither ask for nor pull peer
lists, default True), ``peers_to`` (actor name for verified announces;
without it they are counted only), ``watch_links`` (False: no rtnetlink watch,
default True).

The network coming up (:mod:`.linkwatch`: an interface running, an IPv4
address added) makes the node beacon at once and run a round of its own
(bootstrap addresses due and known peers), instead of waiting for the next
scheduled beacon and sweeper round: a LAN plugged in at once finds itself in
one exchange, not one interval.

Log events (besides the beacon's, responder's and link watch's): ``exchange_rejected``
(source, node_id, reason) for a relayed entry that failed verification,
``pull_failed`` (peer_id, address, reason).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from villagemesh.actors.core.bus import Sender
from villagemesh.actors.core.loopactor import LOOP_CALL_TIMEOUT_S, LoopActor
from villagemesh.actors.core.transport import ConnectionHandedOff, Discover, Discovered, Sighting
from villagemesh.actors.lan.beacon import BeaconConfig, BeaconEndpoint
from villagemesh.actors.lan.identity import Identity
from villagemesh.actors.lan.linkwatch import LinkWatch
from villagemesh.actors.lan.messages import GetLanStatus, LanStatus, PeerAnnounced, PeerProbed, ProbeFailed, ProbePeer
from villagemesh.actors.lan.state import FRESHER, NEW, STALE, Listing, PeerBook, answers_newcomer, pick
from villagemesh.actors.lan.tcp import DiscoveryResponder, Probed, SignedFrames, probe
from villagemesh.actors.sweeper.messages import Sighted
from villagemesh.errors import BusError, ConfigError, ProtocolError, RemoteProtocolError, VillageMeshError
from villagemesh.protocols.discovery import (
    LIST_OVERHEAD,
    MAX_DISCOVERY_FRAME,
    MAX_PEER_LIST,
    Announce,
    DiscoveryConnection,
    DiscoveryRequest,
    DiscoveryResponse,
    PeerList,
    PeerListRequest,
    RelayedPeer,
    decode_discovery,
    entry_size,
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


ROUND_PULLS = 2
"""Random known peers pulled each discovery round, besides the bootstrap addresses."""

PULL_TIMEOUT_S = 3.0
"""Seconds a pull (probe + peer list) may take."""

GOSSIP_MIN_S = 0.2
"""While this node is learning new peers, it exchanges with a random known peer this often...
(measured: 0.05 s spent more on exchanges than it saved in rounds; see docs/benchmarks.md)"""

GOSSIP_MAX_S = 1.6
"""...doubling the delay after each gossip tick that taught nothing, and stopping beyond this
(until the next new peer): a burst of pulls while the network is converging, a handful after."""

_PULLED_LATELY_S = 0.5
"""A gossip tick skips peers exchanged with this recently."""

REGISTRY_REFRESH_S = 30.0
"""A peer the registry already knows, unchanged, is passed on again (its last-seen time) at most
this often: the registry's max_age (300 s) is ten of these."""

ROUND_BOOTSTRAP_MAX = 8
"""Bootstrap addresses a round tries at most (the least recently tried first): a long seed list
is worked through over a few rounds, while exchanges spread what the first seeds knew."""

BOOTSTRAP_REFRESH_S = 30.0
"""A round skips a bootstrap address it exchanged with this recently (by round or gossip): with
every peer as a seed, each round would otherwise exchange with all of them. Every address is
still exchanged with at least this often, and one never reached is tried every round."""

PUBLISH_EVERY_S = 10.0
"""The responder's list is rebuilt at least this often (entries age out), besides on every change."""
"""Seconds a pull (probe + peer list) may take."""

PROBE_BACK_MEMORY = 4096
"""Peers remembered as recently probed back (oldest forgotten first): bounded memory."""


def _put_bounded(table: dict[Any, Any], key: Any, value: Any) -> None:
    """``table[key] = value`` as its newest entry, forgetting the oldest beyond PROBE_BACK_MEMORY."""
    table.pop(key, None)
    if len(table) >= PROBE_BACK_MEMORY:
        table.pop(next(iter(table)))
    table[key] = value


class _Gossip:
    """Timer: a gossip tick."""


@dataclass(frozen=True, slots=True)
class _NetworkUp:
    """Posted by the link watch: the network just came up (why, for the log)."""

    why: str


@dataclass(frozen=True, slots=True)
class _Beacon:
    """Posted by the beacon endpoint: a verified announce, its datagram, its source."""

    announce: Announce
    body: bytes
    source: tuple[str, int]


@dataclass(frozen=True, slots=True)
class _Introduced:
    """Posted by a responder: a prober's verified announce and its body."""

    announce: Announce
    body: bytes


@dataclass(frozen=True, slots=True)
class _Pushed:
    """Posted by a responder: the list a prober that introduced itself pushed."""

    listing: PeerList
    sender: str


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
        self.answering: asyncio.TimerHandle | None = None
        self.exchange = bool(config.get("exchange", True))
        self.book = PeerBook(identity.node_id, book_id=secrets.token_hex(8))
        self.listing: Listing = self.book.listing(identity.clock())
        """What the responder passes on (read on the loop thread; replaced whole, never mutated)."""
        self.cursors: dict[tuple[str, int], tuple[str, int]] = {}
        """Acceptor address -> (book, version) its last list brought us to (oldest forgotten first)."""
        self.pushed: dict[tuple[str, int], int] = {}
        self.bootstrap_tried: dict[tuple[str, int], float] = {}
        """Bootstrap address -> when a round last tried it."""
        self.exchanged_at: dict[tuple[str, int], float] = {}
        """Acceptor address -> when an exchange with it last succeeded (oldest forgotten first)."""
        """Acceptor address -> our book version it has had from us (oldest forgotten first)."""
        self.told: dict[str, float] = {}
        """Node id -> when the registry was last told of it (oldest forgotten first)."""
        self._published: tuple[int, float] = (-1, 0.0)
        """(book version, when) of the published listing."""
        self.pulled: dict[str, float] = {}
        """Node id -> when we last pulled it (oldest forgotten first)."""
        self.responses = SignedFrames(identity.response)
        self.announces = SignedFrames(identity.announce)
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
        self.links: LinkWatch | None = None
        if config.get("watch_links", True):
            self.links = LinkWatch(self._network_up, log=self.io_log)
            self.io_loop.call(self._start_watch(self.links), LOOP_CALL_TIMEOUT_S)

    @staticmethod
    async def _start_watch(links: LinkWatch) -> None:
        links.start()

    async def io_shutdown(self) -> None:
        """Stop beaconing (an answer still due included) and close the UDP socket."""
        answering = getattr(self, "answering", None)
        if answering is not None:
            answering.cancel()
        links = getattr(self, "links", None)
        if links is not None:
            links.close()
        beacon = getattr(self, "beacon", None)
        if beacon is not None:
            await beacon.close()

    def _heard(self, announce: Announce, body: bytes, source: tuple[str, int]) -> None:
        # On the loop thread. A node never heard before has not heard us either, most
        # likely (it just started): answer with our own beacon soon, once for all the
        # newcomers of that moment (mDNS-style), instead of at our next scheduled one,
        # unless that is due soon anyway (see answers_newcomer: only a few of us answer).
        if announce.node_id not in self.heard and announce.node_id != self.identity.node_id:
            if len(self.heard) >= PROBE_BACK_MEMORY:
                self.heard.pop(next(iter(self.heard)))
            self.heard[announce.node_id] = None
            beacon = self.beacon
            if (
                not self.answer_pending
                and beacon is not None
                and answers_newcomer(len(self.heard), beacon.next_beacon_in(), random.random(), exchange=self.exchange)
            ):
                beacon.counts["answers"] += 1  # on the loop thread, like the endpoint's own counts
                self.answer_pending = True
                self.answering = asyncio.get_running_loop().call_later(ANSWER_DELAY_S, self._answer)
        self.post(_Beacon(announce, body, source))

    def _network_up(self, why: str) -> None:
        # On the loop thread: a cable plugged in, an address added. Beacon now (the LAN's other
        # nodes heard the same news) and exchange with the bootstrap peers now, instead of at
        # the next scheduled beacon and round.
        if self.beacon is not None:
            self.beacon.network_up(why)
        self.post(_NetworkUp(why))

    def _answer(self) -> None:
        self.answer_pending = False
        if self.beacon is not None:
            self.beacon.send_now()

    def _requested(self, request: DiscoveryRequest) -> None:
        # On the loop thread: a peer asked who we are without introducing itself; the actor
        # decides whether to ask back.
        self.post(request)

    def _introduced(self, announce: Announce, body: bytes) -> None:
        self.post(_Introduced(announce, body))  # on the loop thread

    def _pushed(self, listing: PeerList, sender: str) -> None:
        self.post(_Pushed(listing, sender))  # on the loop thread

    def on_loop_message(self, message: Any) -> None:
        """What the beacon heard, or what came to the responder: a request, an introduction, a pushed list."""
        if isinstance(message, DiscoveryRequest):
            self._probe_back(message)
        elif isinstance(message, _Beacon):
            announce, body, (host, port) = message.announce, message.body, message.source
            tell = self._remember(RelayedPeer(announce.node_id, announce.timestamp, body), announce, wakes_gossip=False)
            self._publish()
            if tell and self.peers_to is not None:
                heard = PeerAnnounced(announce.node_id, announce.addresses, f"{host}:{port}", body)
                self._tell(self.peers_to, heard)
        elif isinstance(message, _NetworkUp):
            self.exchange_counts["network_up_rounds"] += 1
            self._round(PULL_TIMEOUT_S, lambda found, errors: self._sighted_to_registry(found))
        elif isinstance(message, _Introduced):
            announce = message.announce
            if self._remember(RelayedPeer(announce.node_id, announce.timestamp, message.body), announce):
                self._sighted_to_registry([Sighting(TRANSPORT, message.body.decode(), None)])
            self._publish()
        else:
            assert isinstance(message, _Pushed)
            found = self._learn(message.listing.peers, message.sender)
            self._publish()
            self._sighted_to_registry(found)

    def _sighted_to_registry(self, found: list[Sighting]) -> None:
        if found and self.peers_to is not None:
            self._tell(self.peers_to, Sighted(tuple(found)))

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
        _put_bounded(self.probed_back, request.node_id, now)
        host, port = target

        def then(result: Probed | None, error: BaseException | None) -> None:
            if result is not None:
                self._sighted_to_registry(self._sighted(result))
                self._publish()
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
                    on_announce=self._introduced,
                    on_peer_list=self._pushed,
                    responses=self.responses,
                    peer_lists=self._answer_list,
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
        def report(found: list[Sighting], errors: tuple[str, ...]) -> None:
            self._tell(request.reply_to, Discovered(request.round, TRANSPORT, tuple(found), errors))

        self._round(request.timeout, report)

    def _round(self, timeout: float, report: Callable[[list[Sighting], tuple[str, ...]], None]) -> None:
        """Exchange with the bootstrap addresses due and ROUND_PULLS known peers; ``report`` the
        sightings and the errors (a sweeper's round, or one of our own when the network came up)."""
        asking = self._request()
        # Each probe gets most of the round's time, so its answer (or error) beats the deadline.
        per_probe = max(0.05, timeout * 0.8)
        now = time.monotonic()
        due = [t for t in self.bootstrap if now - self.exchanged_at.get(t, -BOOTSTRAP_REFRESH_S) >= BOOTSTRAP_REFRESH_S]
        due.sort(key=lambda t: self.bootstrap_tried.get(t, -1.0))  # never tried first, then longest ago
        targets = due[:ROUND_BOOTSTRAP_MAX]
        for target in targets:
            self.bootstrap_tried[target] = now
        if self.exchange:
            known = self.book.targets()
            for node_id in pick(sorted(known), ROUND_PULLS, random.randrange):
                if known[node_id] not in targets:
                    targets.append(known[node_id])
                    self._note_pulled(node_id)

        self.exchange_counts["round_probes"] += len(targets)
        plans = {target: self._exchange(target) if self.exchange else (b"", None, 0) for target in targets}

        async def one(host: str, port: int) -> tuple[tuple[str, int], Probed | str]:
            introduce, want, _ = plans[host, port]
            try:
                probed = await probe(host, port, per_probe, request=asking, want=want, introduce=introduce)
            except VillageMeshError as exc:
                return (host, port), f"{host}:{port}: {type(exc).__name__}: {exc}"
            return (host, port), probed

        async def everyone() -> list[tuple[tuple[str, int], Probed | str]]:
            return list(await asyncio.gather(*(one(h, p) for h, p in targets)))

        def then(results: list[tuple[tuple[str, int], Probed | str]] | None, error: BaseException | None) -> None:
            if error is not None:
                raise error  # probes report their own failures: anything else is a bug
            found: list[Sighting] = []
            for target, result in results or ():
                if isinstance(result, Probed):
                    if self.exchange:
                        self._exchanged(target, result, plans[target][2])
                    found.extend(self._sighted(result))
                    found.extend(self._learn(result.peers, result.response.node_id))
            self._publish()
            report(found, tuple(r for _, r in results or () if isinstance(r, str)))

        self.run_on_loop(everyone(), then)

    # -- peer exchange ------------------------------------------------------------------------------

    def _answer_list(self, want: PeerListRequest) -> bytes:
        """The framed PEER_LIST of the changes after the asker's cursor (loop thread: the listing, never the book)."""
        listing = self.listing
        peers, cursor = listing.delta(
            want.book, want.since, want.limit, entry_size, MAX_DISCOVERY_FRAME - LIST_OVERHEAD
        )
        return DiscoveryConnection().send(PeerList(tuple(peers), listing.book, cursor))

    def _exchange(self, target: tuple[str, int]) -> tuple[bytes, PeerListRequest, int]:
        """For an exchange with ``target``: what we write first (our announce, then the changes it
        has not had from us), what we ask for (the changes after our cursor of it), and our
        version it will have had once the exchange succeeds."""
        listing = self.listing
        peers, cursor = listing.delta(
            listing.book, self.pushed.get(target, 0), MAX_PEER_LIST, entry_size, MAX_DISCOVERY_FRAME - LIST_OVERHEAD
        )
        push = DiscoveryConnection().send(PeerList(tuple(peers), listing.book, cursor))
        book, since = self.cursors.get(target, ("", 0))
        return self.announces.framed() + push, PeerListRequest(MAX_PEER_LIST, book, since), cursor

    def _exchanged(self, target: tuple[str, int], probed: Probed, pushed: int) -> None:
        """Remember both cursors after a successful exchange with ``target``."""
        _put_bounded(self.cursors, target, probed.cursor)
        _put_bounded(self.pushed, target, pushed)
        _put_bounded(self.exchanged_at, target, time.monotonic())

    def _remember(self, peer: RelayedPeer, event: Announce | DiscoveryResponse, wakes_gossip: bool = True) -> bool:
        """Into the book; whether the registry should hear of it: a new peer, one that changed, or
        one the registry has not heard of for REGISTRY_REFRESH_S.

        A new peer learned by exchange or probe wakes gossip; one heard by its own beacon
        (``wakes_gossip`` False) does not: it is on our link and beacons again, and when a whole
        LAN appears at once (every cable plugged in together) each node hears all the others'
        beacons within a moment, so gossip would only add an exchange per node per tick to the
        storm (measured at 50 hosts: 30 % more CPU, convergence 3.7-4.1 s instead of 2.8)."""
        target = next((t for t in map(_tcp_target, event.addresses) if t is not None), None)
        found = self.book.add(peer, target, (event.addresses, event.capabilities))
        if found == NEW and wakes_gossip:
            self.learned = True
            if self.gossip_delay is None and self.exchange:
                self.gossip_delay = GOSSIP_MIN_S
                self.schedule(GOSSIP_MIN_S, _Gossip())
        now = time.monotonic()
        if found == STALE or (found == FRESHER and now - self.told.get(peer.node_id, -1e9) < REGISTRY_REFRESH_S):
            return False
        _put_bounded(self.told, peer.node_id, now)
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
            self.exchange_counts["gossip_pulls"] += 1
            self._pull(node_id, *known[node_id])
        self.gossip_delay = delay
        self.schedule(delay, _Gossip())

    def _publish(self) -> None:
        """Refresh what the responder passes on (an asker finds itself in it and skips it), if the
        book changed or PUBLISH_EVERY_S passed (entries age out of it)."""
        now = time.monotonic()
        version, at = self._published
        if version != self.book.version or now - at >= PUBLISH_EVERY_S:
            self.listing = self.book.listing(self.identity.clock())
            self._published = (self.book.version, now)

    def _sighted(self, probed: Probed) -> list[Sighting]:
        """The probed peer's response into the book; a sighting of it if the registry should hear."""
        response = probed.response
        if not self._remember(RelayedPeer(response.node_id, response.timestamp, probed.body), response):
            return []
        return [Sighting(TRANSPORT, probed.body.decode(), probed.latency_ms)]

    def _learn(self, peers: tuple[RelayedPeer, ...], source: str) -> list[Sighting]:
        """Verify what ``source`` passed on that is news to the book; the sightings the registry should hear of."""
        found: list[Sighting] = []
        for peer in peers:
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
            if self._remember(peer, event):
                found.append(Sighting(TRANSPORT, peer.body.decode(), None))
        return found

    def _note_pulled(self, node_id: str) -> None:
        _put_bounded(self.pulled, node_id, time.monotonic())

    def _pull(self, node_id: str, host: str, port: int) -> None:
        def then(result: Probed | None, error: BaseException | None) -> None:
            if result is not None:
                self._exchanged((host, port), result, pushed)
                found = [*self._sighted(result), *self._learn(result.peers, node_id)]
                self._publish()
                self._sighted_to_registry(found)
            elif isinstance(error, VillageMeshError | asyncio.CancelledError):
                self.exchange_counts["pull_failed"] += 1
                self.io_log.info("pull_failed", peer_id=node_id, address=f"{host}:{port}", reason=str(error))
            else:
                assert error is not None
                raise error

        introduce, want, pushed = self._exchange((host, port))
        self.run_on_loop(
            probe(host, port, PULL_TIMEOUT_S, request=self._request(), want=want, introduce=introduce), then
        )

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
                self._sighted(result)  # into the book: the asker tells whom it wants
                self._publish()
                outcome = PeerProbed(
                    request.host,
                    request.port,
                    result.response.node_id,
                    result.response.addresses,
                    result.latency_ms,
                    result.body,
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
