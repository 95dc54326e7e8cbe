"""The BetaNet actor: a Sphinx mixnode relay, and the anonymous transport of this node.

It speaks the transport contract (:mod:`villagemesh.actors.core.transport`)::

    retrier ──Transmit(peer, betanet://host:port/key, envelope)──▶ pick 3 mixes (rule 2 of .state), a SURB back
        body = signed MESSAGE (envelope, SURB) ─▶ Sphinx packet ─▶ first mix   ──TransmitResult (failures only,
                                                                                 when report_success is False)
    retrier ──Transmit(peer, REPLY_ADDRESS, ack)──▶ the SURB its message came with ─▶ signed REPLY ─▶ its first hop
    retrier ──Transmit(peer, address, an envelope answering message m)──▶ m's SURB, if still here, with a SURB back
    mix link (Noise session, acceptor's SECURE route) ──packet──▶ unwrap (protocols.sphinx) ─▶ replay tag committed
        RELAY:   held for the sender's delay (a bounded queue, ForwardDue timers) ─▶ next mix's link
        DELIVER: body checked (signature for this node, envelope sender = signer) ──Received──▶ deliver_to
        a reply on one of our SURBs: opened with the keys kept for it ──Received──▶ deliver_to
    cover: loop (3 mixes and back here) and drop (3 mixes, thrown away) at Poisson rates

``Received.remote`` is the node id that *signed* the body, and the envelope's
``sender`` must be that node id (as the WebSocket transport enforces for its
authenticated sessions). The recipient learns the sender's node id, never its
address. Mix links are ordinary Noise sessions of the kit
(:mod:`villagemesh.actors.core.secure.tcp`); each Sphinx packet travels as an
envelope of kind ``betanet.packet`` from the link's node (``created_at`` 0, so it
tells the next hop no time).

What is dropped (counted in the status, never answered: a mix says nothing to
whoever sent a bad packet): a packet of the wrong size, version or epoch, a
changed header, a replay, a next hop this mix does not know, a full held
queue, a body that does not verify. A garbage packet costs the X25519 and the
MAC check that refuse it, nothing more.

Config (``ctx.config``, msgpack-able so the relay can run with
``isolation="process"``): ``keys`` (64 bytes, :meth:`NodeKeys.to_bytes`, or a
``NodeKeys``), ``host`` / ``port`` (where this node's acceptor listens: the
address it announces), ``replay_path`` (its SQLite file, required),
``deliver_to``, ``registry`` (asked for mixnodes every ``refresh_s``, 10 s),
``mixnodes`` (``[[node_id, address], ...]``, known without the registry),
``mean_delay_ms`` (per-hop mean of the exponential delays it chooses as a
sender; 0 = none), ``loop_rate`` / ``drop_rate`` (cover packets per second; 0 =
off), ``loop_timeout`` (s), ``epoch_seconds`` (3600), ``held_capacity`` (10,000),
``replay_capacity`` (1,000,000 per epoch), ``seed`` (for its random choices; tests).
Log events: ``betanet_started`` (address, epoch, replay_tags), ``betanet_epoch``
(epoch, pruned), ``betanet_cache_full`` (epoch), ``betanet_link_failed`` (peer_id, reason).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from typing import Any

from villagemesh.actors.core.loopactor import LOOP_CALL_TIMEOUT_S, LoopActor
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.core.secure.tcp import SecureConnection, dial, responder_factory
from villagemesh.actors.core.transport import (
    REPLY_ADDRESS,
    ConnectionHandedOff,
    Discover,
    Discovered,
    Received,
    Transmit,
    TransmitMany,
    TransmitResult,
)
from villagemesh.actors.registry.messages import ListRoutes, RoutesList
from villagemesh.errors import (
    ConfigError,
    ConnectError,
    LocalProtocolError,
    RemoteProtocolError,
    VillageMeshError,
)
from villagemesh.protocols.envelope import Message, Priority, decode_message, encode_message
from villagemesh.protocols.sphinx import (
    MAX_EPOCH,
    Deliver,
    Forward,
    Surb,
    SurbReply,
    create_packet,
    create_surb,
    surb_reply,
    unwrap,
)
from villagemesh.protocols.sphinx.body import (
    LOOP_ID_BYTES,
    MAX_TWO_SURB_ENVELOPE,
    BodyKind,
    Drop,
    Loop,
    Signed,
    decode_body,
    encode_drop,
    encode_loop,
    encode_reply,
)
from villagemesh.protocols.sphinx.body import (
    encode_message as encode_message_body,
)

from .messages import BetanetStatus, CoverDue, EpochTick, ForwardDue, GetBetanetStatus, RefreshMixnodes
from .state import (
    MIX_HOPS,
    HeldQueue,
    LoopTracker,
    Mixnode,
    PendingSurbs,
    SurbStore,
    accepted_epochs,
    directory_from_routes,
    epoch_of,
    format_address,
    mix_secret,
    own_mixnode,
    parse_address,
    pick_route,
    poisson_gap,
    sender_delays,
)
from .store import ReplayStore

__all__ = ["PACKET_KIND", "TRANSPORT", "BetanetActor", "betanet_status"]

TRANSPORT = "betanet"
PACKET_KIND = "betanet.packet"
"""The envelope kind a Sphinx packet travels in on a mix link."""

_NOT_SENT = (ConnectError, LocalProtocolError, ConfigError)
"""Failures that mean nothing left this node (no route, no SURB, too large, a bad address):
retryable at once on another transport."""


class BetanetActor(LoopActor):
    """Relays Sphinx packets between mixes, and sends and receives this node's anonymous envelopes."""

    def on_start(self) -> None:
        cfg = self.ctx.config
        self.keys = NodeKeys.of(cfg.get("keys"), actor="betanet")
        self.node_id = self.keys.node_id
        self.secret = mix_secret(self.keys.static_key)
        host, port = cfg.get("host"), cfg.get("port")
        if not isinstance(host, str) or not isinstance(port, int):
            raise ConfigError(f"betanet needs config['host'] (str) and ['port'] (int), got {host!r}, {port!r}")
        self.me: Mixnode = own_mixnode(self.node_id, host, port, self.secret)
        self.address = format_address(host, port, self.me.public_key)
        path = cfg.get("replay_path")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"the betanet actor needs config['replay_path'] (its SQLite file), got {path!r}")
        self.deliver_to: str | None = cfg.get("deliver_to")
        self.registry: str | None = cfg.get("registry")
        self.refresh_s = float(cfg.get("refresh_s", 10.0))
        self.mean_delay_ms = float(cfg.get("mean_delay_ms", 0.0))
        self.loop_rate = float(cfg.get("loop_rate", 0.0))
        self.drop_rate = float(cfg.get("drop_rate", 0.0))
        self.epoch_seconds = float(cfg.get("epoch_seconds", 3600.0))
        if not self.epoch_seconds > 0 or self.mean_delay_ms < 0 or self.loop_rate < 0 or self.drop_rate < 0:
            raise ConfigError(
                "betanet: epoch_seconds must be > 0 and mean_delay_ms, loop_rate, drop_rate >= 0, got "
                f"{self.epoch_seconds!r}, {self.mean_delay_ms!r}, {self.loop_rate!r}, {self.drop_rate!r}"
            )
        self.replay_capacity = int(cfg.get("replay_capacity", 1_000_000))
        self.rng = random.Random(cfg.get("seed"))
        self.counts: Counter[str] = Counter()
        self.held = HeldQueue(int(cfg.get("held_capacity", 10_000)))
        self.surbs = SurbStore()
        self.pending = PendingSurbs()
        self.loops = LoopTracker(float(cfg.get("loop_timeout", 30.0)))
        self.static: dict[str, Mixnode] = {}
        for node_id, address in cfg.get("mixnodes", ()):
            parsed = parse_address(address)
            if node_id != self.node_id:
                self.static[node_id] = Mixnode(node_id, parsed.host, parsed.port, parsed.public_key)
        self.directory: dict[str, Mixnode] = dict(self.static)
        self.epoch = epoch_of(time.time(), self.epoch_seconds)
        if self.epoch > MAX_EPOCH:
            raise ConfigError(f"betanet: epoch_seconds {self.epoch_seconds!r} makes epoch numbers beyond {MAX_EPOCH}")
        self.store = ReplayStore(path, synchronous=str(cfg.get("synchronous", "NORMAL")))
        self.caches = self.store.load(accepted_epochs(self.epoch), self.replay_capacity)
        self._forward_armed: float | None = None
        self.start_io()
        self.links: dict[str, SecureConnection] = {}  # loop thread only
        self.dialing: dict[str, asyncio.Future[SecureConnection]] = {}  # loop thread only
        self.factory = responder_factory(
            static_key=self.keys.static_key,
            signing_key=self.keys.signing_key,
            on_envelope=self._link_envelope,
            on_open=self._link_opened,
            on_close=self._link_closed,
            log=self.io_log,
        )
        self._schedule_epoch_tick()
        if self.registry is not None:
            self.handle(RefreshMixnodes())
        for kind, rate in (("loop", self.loop_rate), ("drop", self.drop_rate)):
            if rate > 0:
                self.schedule(poisson_gap(self.rng, rate), CoverDue(kind))
        self.ctx.log.emit(
            "betanet_started", address=self.address, epoch=self.epoch, replay_tags=sum(map(len, self.caches.values()))
        )

    async def io_shutdown(self) -> None:
        for connection in list(getattr(self, "links", {}).values()):
            connection.close()

    def on_stop(self) -> None:
        try:
            super().on_stop()
        finally:
            store = getattr(self, "store", None)
            if store is not None:
                store.close()

    # -- the loop side: links ---------------------------------------------------------------------

    def _link_envelope(self, message: Message, raw: bytes, peer_id: str) -> None:
        if message.kind == PACKET_KIND:
            self.post(("packet", message.payload))
        else:
            self.post(("foreign", message.kind))

    def _link_opened(self, connection: SecureConnection) -> None:
        self.links.setdefault(connection.peer_id, connection)

    def _link_closed(self, connection: SecureConnection, error: BaseException | None) -> None:
        peer_id = connection.peer_id
        if self.links.get(peer_id) is connection:
            del self.links[peer_id]

    async def _link(self, node: Mixnode) -> SecureConnection:
        link = self.links.get(node.node_id)
        if link is not None and not link.is_closing:
            return link
        pending = self.dialing.get(node.node_id)
        if pending is None:
            pending = asyncio.ensure_future(
                dial(
                    node.host,
                    node.port,
                    static_key=self.keys.static_key,
                    signing_key=self.keys.signing_key,
                    expected_peer=node.node_id,
                    on_envelope=self._link_envelope,
                    on_close=self._link_closed,
                    log=self.io_log,
                )
            )
            self.dialing[node.node_id] = pending
            pending.add_done_callback(lambda _: self.dialing.pop(node.node_id, None))
        link = await asyncio.shield(pending)
        self.links[node.node_id] = link
        return link

    async def _send_on_link(self, node: Mixnode, raw: bytes) -> None:
        (await self._link(node)).send_envelope(raw)

    def _wrap(self, next_node: str, packet: bytes) -> bytes:
        return encode_message(
            Message(
                id=os.urandom(16),
                kind=PACKET_KIND,
                sender=self.node_id,
                recipient=next_node,
                priority=Priority.NORMAL,
                created_at=0.0,
                ttl=60.0,
                correlation_id=None,
                payload=packet,
            )
        )

    def _send_packet(self, next_node: str, packet: bytes, then: Any = None) -> None:
        """Put ``packet`` on the link to ``next_node``; ``then(error)`` in this thread (None: count failures)."""
        node = self.me if next_node == self.node_id else self.directory.get(next_node)
        if node is None:
            error = ConnectError(f"betanet: next hop {next_node} is not a known mixnode")
            self.counts["dropped.unknown_hop"] += 1
            if then is not None:
                then(error)
            return

        def done(_: Any, error: BaseException | None) -> None:
            if error is not None:
                self.counts["link.failed"] += 1
                self.io_log.warning("betanet_link_failed", peer_id=next_node, reason=f"{type(error).__name__}: {error}")
            else:
                self.counts["packets.sent"] += 1
            if then is not None:
                then(error)

        self.run_on_loop(self._send_on_link(node, self._wrap(next_node, packet)), done)

    # -- the actor thread ---------------------------------------------------------------------------

    def on_loop_message(self, message: Any) -> None:
        what, value = message
        if what == "packet":
            self._process(value)
        else:
            self.counts["dropped.foreign_kind"] += 1

    def handle(self, msg: Any) -> Any:
        if isinstance(msg, Transmit):
            self._transmit(msg)
        elif isinstance(msg, TransmitMany):
            for transmit in msg:
                self._transmit(transmit)
        elif isinstance(msg, ForwardDue):
            self._forward_armed = None
            self._forward_due()
        elif isinstance(msg, ConnectionHandedOff):
            self.adopt_handed_off(msg, self.factory)
        elif isinstance(msg, RoutesList):
            self.directory = {**directory_from_routes(msg, self.node_id), **self.static}
        elif isinstance(msg, RefreshMixnodes):
            self.tell_or_log(self.registry, ListRoutes(reply_to=self.name))
            self.schedule(self.refresh_s, RefreshMixnodes())
        elif isinstance(msg, CoverDue):
            self._cover(msg.kind)
        elif isinstance(msg, EpochTick):
            self._new_epoch()
        elif isinstance(msg, Discover):
            # Mixnodes come from the registry (their betanet addresses in signed announces).
            self.tell_or_log(msg.reply_to, Discovered(msg.round, TRANSPORT, (), ()))
        elif isinstance(msg, GetBetanetStatus):
            return BetanetStatus(self.address, self.epoch, len(self.directory), len(self.held), dict(self.counts))
        else:
            return super().handle(msg)
        return None

    def _process(self, packet: bytes) -> None:
        try:
            result = unwrap(packet, self.secret, self.caches)
        except RemoteProtocolError:
            self.counts["dropped.invalid"] += 1
            return
        except LocalProtocolError:
            self.counts["dropped.cache_full"] += 1
            self.ctx.log.emit("betanet_cache_full", level="warning", epoch=self.epoch)
            return
        self.store.add(result.epoch, result.tag)  # committed before the packet goes anywhere
        self.counts["packets.unwrapped"] += 1
        if isinstance(result, Forward):
            next_node = result.next_node.hex()
            if result.delay_ms == 0:
                self._send_packet(next_node, result.packet)
            elif self.held.push(time.monotonic() + result.delay_ms / 1000, next_node, result.packet):
                self._arm_forward()
            else:
                self.counts["dropped.held_full"] += 1
        elif isinstance(result, Deliver):
            self._arrived(result.message, reply=False)
        else:
            self._reply_arrived(result)

    def _arm_forward(self) -> None:
        due = self.held.next_due()
        if due is None or (self._forward_armed is not None and self._forward_armed <= due):
            return
        self._forward_armed = due
        self.schedule(max(0.0, due - time.monotonic()), ForwardDue())

    def _forward_due(self) -> None:
        for next_node, packet in self.held.pop_due(time.monotonic()):
            self._send_packet(next_node, packet)
        self._arm_forward()

    def _reply_arrived(self, reply: SurbReply) -> None:
        keys = self.pending.take(reply.surb_id)
        if keys is None:
            self.counts["dropped.unknown_surb"] += 1
            return
        try:
            body = keys.open(reply)
        except RemoteProtocolError:
            self.counts["dropped.invalid_reply"] += 1
            return
        self._arrived(body, reply=True)

    def _arrived(self, body: bytes, *, reply: bool) -> None:
        try:
            parsed = decode_body(body, self.node_id)
        except RemoteProtocolError:
            self.counts["dropped.invalid_body"] += 1
            return
        if isinstance(parsed, Loop):
            self.counts["cover.loop_back" if self.loops.back(parsed.loop_id) else "dropped.unknown_loop"] += 1
            return
        if isinstance(parsed, Drop):
            self.counts["cover.drop_received"] += 1
            return
        self._signed_arrived(parsed, reply=reply)

    def _signed_arrived(self, parsed: Signed, *, reply: bool) -> None:
        if (parsed.kind is BodyKind.REPLY) is not reply:
            self.counts["dropped.wrong_kind"] += 1
            return
        try:
            message = decode_message(parsed.envelope)
        except RemoteProtocolError:
            self.counts["dropped.invalid_envelope"] += 1
            return
        if message.sender != parsed.sender:
            self.counts["dropped.sender_mismatch"] += 1
            return
        self.surbs.add(parsed.sender, message.id, parsed.surbs)
        self.counts["received"] += 1
        if self.deliver_to is None:
            self.counts["dropped.no_deliver_to"] += 1
            return
        self.tell_or_log(self.deliver_to, Received(TRANSPORT, parsed.envelope, parsed.sender))

    # -- sending ------------------------------------------------------------------------------------

    def _transmit(self, request: Transmit) -> None:
        def answer(error: BaseException | None) -> None:
            if error is None:
                if request.report_success:
                    self.metrics.count("transmit_ok")  # the bus's metrics, as every transport counts them
                    self.tell_or_log(request.reply_to, self._result(request, True, False, None))
                return
            self.metrics.count("transmit_failed")
            retryable = isinstance(error, _NOT_SENT)
            reason = f"{type(error).__name__}: {error}"
            self.tell_or_log(request.reply_to, self._result(request, False, retryable, reason))

        try:
            first_hop, packet = self._build(request)
        except _NOT_SENT as exc:
            answer(exc)
            return
        self._send_packet(first_hop, packet, then=answer)

    @staticmethod
    def _result(request: Transmit, ok: bool, retryable: bool, error: str | None) -> TransmitResult:
        return TransmitResult(request.message_id, TRANSPORT, request.peer_id, ok, retryable, error)

    def _build(self, request: Transmit) -> tuple[str, bytes]:
        """``(first hop, packet)`` for a Transmit: on a SURB of the peer's, or along a new route.

        On a SURB go: an answer to :data:`REPLY_ADDRESS` (the retrier's ack: on the
        SURB of the message it acknowledges, else the peer's newest, and without a
        SURB back: acks are not acknowledged), and any envelope answering a message
        whose SURB is still here (an application's reply: with a SURB back, so that
        its own ack can return). Everything else takes a new route.
        """
        try:
            answers = decode_message(request.envelope).correlation_id
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"betanet: not an envelope: {exc}") from exc
        if request.address == REPLY_ADDRESS:
            surb = self.surbs.take(request.peer_id, answers)
            if surb is None:
                raise ConnectError(f"betanet: no reply block from {request.peer_id} to answer on")
            body = encode_reply(self.keys.signing_key, request.peer_id, request.envelope)
            self.counts["sent.acks_on_surbs"] += 1
            first_hop, packet = surb_reply(surb, body)
            return first_hop.hex(), packet
        if answers is not None and self.surbs.has(request.peer_id, answers):
            back = self._surb_back()
            body = encode_reply(self.keys.signing_key, request.peer_id, request.envelope, back)
            surb = self.surbs.take(request.peer_id, answers)
            if surb is None:  # pragma: no cover - has() said it is here, and only this thread takes
                raise ConnectError(f"betanet: the reply block of {answers.hex()} went missing")
            self.counts["sent.replies_on_surbs"] += 1
            first_hop, packet = surb_reply(surb, body)
            return first_hop.hex(), packet
        target = parse_address(request.address)
        recipient = Mixnode(request.peer_id, target.host, target.port, target.public_key)
        route = pick_route(self.rng, self.directory, (self.node_id, request.peer_id))
        backs = [self._surb_back() for _ in range(2 if len(request.envelope) <= MAX_TWO_SURB_ENVELOPE else 1)]
        body = encode_message_body(self.keys.signing_key, request.peer_id, request.envelope, *backs)
        packet = create_packet([m.hop() for m in route] + [recipient.hop()], body, self._delays(), epoch=self.epoch)
        self.directory.setdefault(recipient.node_id, recipient)
        self.counts["sent.messages"] += 1
        return route[0].node_id, packet

    def _surb_back(self) -> Surb:
        """A new SURB through three mixes back to this node; its keys wait for the answer."""
        back = pick_route(self.rng, self.directory, (self.node_id,))
        surb, keys = create_surb([m.hop() for m in back] + [self.me.hop()], self._delays(), epoch=self.epoch)
        self.pending.add(keys)
        return surb

    def _delays(self) -> list[int]:
        return sender_delays(self.rng, self.mean_delay_ms, MIX_HOPS)

    def _cover(self, kind: str) -> None:
        rate = self.loop_rate if kind == "loop" else self.drop_rate
        self.schedule(poisson_gap(self.rng, rate), CoverDue(kind))
        try:
            mixes = pick_route(self.rng, self.directory, (self.node_id,))
        except ConnectError:
            self.counts["cover.skipped"] += 1
            return
        if kind == "loop":
            loop_id = os.urandom(LOOP_ID_BYTES)
            self.loops.sent(loop_id, time.monotonic())
            path, body = [*mixes, self.me], encode_loop(loop_id)
        else:
            path, body = mixes, encode_drop()
        delays = sender_delays(self.rng, self.mean_delay_ms, len(path) - 1)
        packet = create_packet([m.hop() for m in path], body, delays, epoch=self.epoch)
        self.counts[f"cover.{kind}_sent"] += 1
        self._send_packet(path[0].node_id, packet)

    def _new_epoch(self) -> None:
        self.epoch = epoch_of(time.time(), self.epoch_seconds)
        keep = accepted_epochs(self.epoch)
        fresh = {e: self.caches[e] for e in keep if e in self.caches}
        fresh.update(self.store.load([e for e in keep if e not in fresh], self.replay_capacity))
        self.caches = fresh
        pruned = self.store.prune(keep)
        self.loops.expire(time.monotonic())
        self.ctx.log.emit("betanet_epoch", epoch=self.epoch, pruned=pruned)
        self._schedule_epoch_tick()

    def _schedule_epoch_tick(self) -> None:
        now = time.time()
        self.schedule((self.epoch + 1) * self.epoch_seconds - now + 0.001, EpochTick())


def betanet_status(client: Any, name: str = TRANSPORT, *, timeout: float = LOOP_CALL_TIMEOUT_S) -> BetanetStatus:
    """Ask the relay named ``name`` for its :class:`BetanetStatus`."""
    status = client.ask(name, GetBetanetStatus(), timeout=timeout)
    if not isinstance(status, BetanetStatus):
        raise VillageMeshError(f"betanet: {name!r} answered {type(status).__name__}, not BetanetStatus")
    return status
