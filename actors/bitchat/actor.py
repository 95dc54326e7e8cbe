"""The BitChat actor: this node on a BitChat BLE mesh, as one transport of the node.

Thin by design: the relay decisions are in :mod:`.state`, the plumbing between
radio and state in :mod:`.driver`, the wire format in
:mod:`villagemesh.protocols.bitchat`::

    radio thread ──RadioEvent──▶ post ──▶ on_loop_message ──▶ MeshDriver.handle ──▶ relays scheduled (RelayDue)
    retrier ──Transmit(peer, bitchat://<peer id> | REPLY_ADDRESS, envelope)──▶ wrap: signed 0x56 packet
                                                   ──▶ MeshDriver.originate ──TransmitResult──▶ reply_to
    a 0x56 packet for us (or broadcast) ──unwrap (signature; sender = signer)──Received(remote=node id)──▶ deliver_to
    AnnounceDue (every ``announce_s``) ──▶ BitChat announce (0x01, our neighbours) + villagemesh announce (0x57)
    sweeper ──Discover──▶ Discovered(sightings: the verified villagemesh announces heard since the last round)

It speaks the transport contract (:mod:`villagemesh.actors.core.transport`).
A Transmit with no neighbour in range is a *retryable* ``ConnectError`` (the
bytes surely went nowhere); once handed to the radio it is a success (the mesh
may still lose it: the retrier's end-to-end ack settles it). ``REPLY_ADDRESS``
means the BitChat peer id the peer's last envelope came from. Envelopes from
other BitChat apps' packets (chat messages, Noise sessions) are relayed but not
delivered to villagemesh: they are counted (``foreign``).

The radio comes from ``config["radio"]``: a callable given our peer id that
returns a :class:`~.radio.Radio` (the in-memory one in tests; the BLE radio of
:mod:`.ble` on a machine with BlueZ). Without one the actor runs, logs
``bitchat_radio_unavailable`` (reason) once and answers every Transmit with a
retryable failure naming it: a node without Bluetooth still starts.

Config: ``keys`` (NodeKeys or its 64 bytes; the Ed25519 key signs, the X25519
static key is the Noise key our BitChat peer id derives from), ``radio``,
``deliver_to``, ``nickname`` (default: the node id's first 8 characters),
``announce_s`` (default 4 s, BitChat's interval while isolated),
``capabilities`` (a :class:`~villagemesh.protocols.discovery.Capabilities`; without
it no villagemesh announce is sent), ``addresses`` (extra addresses to announce),
``seed`` (jitter; tests). A :class:`~.messages.PeerSeen` from the scanner child
(:mod:`.scanner`) makes the BLE radio connect to that peer. Log events: ``bitchat_started`` (peer_id, radio),
``bitchat_radio_unavailable`` (reason), ``bitchat_packet_refused`` (reason ``signature``, ``announce`` or
``stale``, sender, type, link: a packet screened out before the seen-set, see :mod:`.driver`; the driver
gets our wall clock, so announces are windowed; at most 10 per reason and link in 10 s, the rest counted
in one ``bitchat_packet_refused_suppressed`` (reason, link, count) when the next window opens, so a flood
of forgeries cannot flood the log).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

from villagemesh.actors.bitchat.ble import BleCentral
from villagemesh.actors.bitchat.driver import MeshDriver, make_announce
from villagemesh.actors.bitchat.gatt import BleRadio
from villagemesh.actors.bitchat.messages import AnnounceDue, BitchatStatus, GetBitchatStatus, PeerSeen, RelayDue
from villagemesh.actors.bitchat.radio import LinkDown, LinkUp, Radio, RadioEvent
from villagemesh.actors.bitchat.state import TRANSPORT, format_address, parse_address
from villagemesh.actors.core.logbudget import LogBudget
from villagemesh.actors.core.loopactor import LoopActor
from villagemesh.actors.core.secure.keys import NodeKeys
from villagemesh.actors.core.transport import (
    REPLY_ADDRESS,
    Discover,
    Discovered,
    Received,
    Sighting,
    Transmit,
    TransmitMany,
    TransmitResult,
)
from villagemesh.errors import ConfigError, ConnectError, ProtocolError, RemoteProtocolError
from villagemesh.protocols.bitchat import MessageType, Packet, peer_id, unwrap, wrap
from villagemesh.protocols.discovery import Announce, Capabilities, decode_discovery, encode_discovery, sign_announce
from villagemesh.protocols.discovery import verify as verify_discovery
from villagemesh.protocols.envelope import decode_message

__all__ = ["TRANSPORT", "BitchatActor"]


class BitchatActor(LoopActor):
    """This node's BitChat mesh transport."""

    def on_start(self) -> None:
        cfg = self.ctx.config
        self.keys = NodeKeys.of(cfg.get("keys"), actor="bitchat")
        self.node_id = self.keys.node_id
        self.me = peer_id(self.keys.static_public)
        self.deliver_to: str | None = cfg.get("deliver_to")
        self.nickname = str(cfg.get("nickname") or self.node_id[:8])
        self.announce_s = float(cfg.get("announce_s", 4.0))
        if not self.announce_s > 0:
            raise ConfigError(f"bitchat: announce_s must be > 0 seconds, got {self.announce_s!r}")
        capabilities = cfg.get("capabilities")
        if capabilities is not None and not isinstance(capabilities, Capabilities):
            raise ConfigError(f"bitchat: capabilities must be a Capabilities, got {type(capabilities).__name__}")
        self.capabilities: Capabilities | None = capabilities
        self.addresses = (format_address(self.me), *tuple(cfg.get("addresses", ())))
        self.counts: Counter[str] = Counter()
        self.refusals = LogBudget(per_window=10, window_s=10.0)
        """How many refusal warnings reach the log (each refusal is counted by the driver all the same)."""
        self.routes: dict[str, bytes] = {}
        """Node id -> the BitChat peer id its envelopes come from (for REPLY_ADDRESS)."""
        self.sightings: dict[str, Sighting] = {}
        self._armed: float | None = None
        self.start_io()
        factory = cfg.get("radio")
        self.radio: Radio | None = None
        self.unavailable: str | None = None
        if factory is None:
            self.unavailable = "no radio configured (config['radio'])"
        else:
            self.radio = factory(self.me)
        rng = random.Random(cfg.get("seed"))
        self.driver = MeshDriver(
            self.me, _Idle() if self.radio is None else self.radio, rng, self._delivered, on_refused=self._refused
        )
        if self.radio is None:
            self.ctx.log.emit("bitchat_radio_unavailable", level="warning", reason=self.unavailable)
        else:
            self.radio.start(self._heard)
        self.ctx.log.emit("bitchat_started", peer_id=self.me.hex(), radio=type(self.radio).__name__)
        self.schedule(0.0, AnnounceDue())

    def _heard(self, event: RadioEvent) -> None:
        self.post(event)  # from the radio's thread: handled in ours

    async def io_shutdown(self) -> None:
        radio = getattr(self, "radio", None)
        if radio is not None:
            radio.stop()

    # -- the actor thread ---------------------------------------------------------------------------

    def on_loop_message(self, message: Any) -> None:
        if isinstance(message, RadioEvent):
            self.driver.handle(message, time.monotonic(), _now_ms())
            if isinstance(message, LinkUp | LinkDown):
                self.counts["link_up" if isinstance(message, LinkUp) else "link_down"] += 1
            self._arm()
        else:
            raise TypeError(f"bitchat got an unexpected {type(message).__name__} from its radio")

    def handle(self, msg: Any) -> Any:
        if isinstance(msg, Transmit):
            self._transmit(msg)
        elif isinstance(msg, TransmitMany):
            for transmit in msg:
                self._transmit(transmit)
        elif isinstance(msg, RelayDue):
            self._armed = None
            self.driver.tick(time.monotonic())
            self._arm()
        elif isinstance(msg, AnnounceDue):
            self._announce()
            self.schedule(self.announce_s, AnnounceDue())
        elif isinstance(msg, PeerSeen):
            if isinstance(self.radio, BleCentral | BleRadio):
                self.radio.seen(msg.peer_id, msg.address)
            else:
                self.counts["seen_ignored"] += 1  # a scanner's report, but this radio dials nobody
        elif isinstance(msg, Discover):
            sightings, self.sightings = tuple(self.sightings.values()), {}
            self.tell_or_log(msg.reply_to, Discovered(msg.round, TRANSPORT, sightings, ()))
        elif isinstance(msg, GetBitchatStatus):
            return BitchatStatus(
                peer_id=self.me.hex(),
                radio=f"unavailable: {self.unavailable}" if self.unavailable else type(self.radio).__name__,
                links=tuple(sorted(link.hex() for link in self.driver.state.links)),
                peers=tuple(sorted(peer.hex() for peer in self.driver.keys)),
                counters={
                    **self.counts,
                    **{f"refused.{k}": v for k, v in self.driver.refused.items()},
                    **_counters(self.driver),
                },
            )
        else:
            return super().handle(msg)
        return None

    def _arm(self) -> None:
        deadline = self.driver.next_deadline()
        if deadline is None or (self._armed is not None and self._armed <= deadline):
            return
        self._armed = deadline
        self.schedule(max(0.0, deadline - time.monotonic()), RelayDue())

    # -- sending ------------------------------------------------------------------------------------

    def _transmit(self, request: Transmit) -> None:
        try:
            recipient = self._recipient(request)
            if self.unavailable is not None:
                raise ConnectError(f"BitChat radio unavailable: {self.unavailable}")
            if not self.driver.state.links:
                raise ConnectError(f"no BitChat neighbour in range for {request.peer_id}")
            message = decode_message(request.envelope)
            packet = wrap(message, self.keys.signing_key, self.me, _now_ms(), recipient_id=recipient)
            self.driver.originate(packet, time.monotonic())
        except (ConnectError, ConfigError, ProtocolError) as exc:
            self.metrics.count("transmit_failed")
            retryable = isinstance(exc, ConnectError | ConfigError)
            self.tell_or_log(request.reply_to, self._result(request, False, retryable, f"{type(exc).__name__}: {exc}"))
            return
        self._arm()
        self.counts["sent"] += 1
        if request.report_success:
            self.metrics.count("transmit_ok")
            self.tell_or_log(request.reply_to, self._result(request, True, False, None))

    def _recipient(self, request: Transmit) -> bytes:
        if request.address != REPLY_ADDRESS:
            return parse_address(request.address)
        route = self.routes.get(request.peer_id)
        if route is None:
            raise ConnectError(f"no BitChat route back to {request.peer_id}: none of its envelopes came this way")
        return route

    @staticmethod
    def _result(request: Transmit, ok: bool, retryable: bool, error: str | None) -> TransmitResult:
        return TransmitResult(request.message_id, TRANSPORT, request.peer_id, ok, retryable, error)

    def _announce(self) -> None:
        if self.radio is None:
            return
        now = time.monotonic()
        links = self.driver.state.links
        self.driver.originate(
            make_announce(self.keys.signing_key, self.keys.static_public, self.nickname, links, _now_ms()), now
        )
        if self.capabilities is not None:
            announce = sign_announce(
                self.keys.signing_key, addresses=self.addresses, capabilities=self.capabilities, timestamp=time.time()
            )
            packet = Packet(MessageType.VILLAGEMESH_ANNOUNCE, self.me, _now_ms(), encode_discovery(announce))
            self.driver.originate(packet, now)
        self._arm()

    # -- receiving ----------------------------------------------------------------------------------

    def _refused(self, reason: str, packet: Packet, link: bytes) -> None:
        log, ended = self.refusals.admit((reason, link), time.monotonic())
        if ended:
            self.ctx.log.emit(
                "bitchat_packet_refused_suppressed", level="warning", reason=reason, link=link.hex(), count=ended
            )
        if log:
            self.ctx.log.emit(
                "bitchat_packet_refused",
                level="warning",
                reason=reason,
                sender=packet.sender_id.hex(),
                type=packet.type,
                link=link.hex(),
            )

    def _delivered(self, packet: Packet, link: bytes) -> None:
        if packet.type == MessageType.VILLAGEMESH:
            self._envelope(packet)
        elif packet.type == MessageType.VILLAGEMESH_ANNOUNCE:
            self._sighted(packet)
        else:
            self.counts["foreign"] += 1

    def _envelope(self, packet: Packet) -> None:
        try:
            message = unwrap(packet)
        except RemoteProtocolError:
            self.counts["refused.envelope"] += 1
            return
        self.routes[message.sender] = packet.sender_id
        self.counts["received"] += 1
        self.tell_or_log(self.deliver_to, Received(TRANSPORT, packet.payload[32:], message.sender))

    def _sighted(self, packet: Packet) -> None:
        try:
            event = decode_discovery(packet.payload)
            if not isinstance(event, Announce):
                raise RemoteProtocolError(f"a {type(event).__name__} where an announce belongs")
            verify_discovery(event)
        except (RemoteProtocolError, ProtocolError):
            self.counts["refused.sighting"] += 1
            return
        if event.node_id == self.node_id:
            return
        self.sightings[event.node_id] = Sighting(TRANSPORT, packet.payload.decode(), None)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _counters(driver: MeshDriver) -> dict[str, int]:
    c = driver.state.counters
    return {
        "relays_sent": c.relays_sent,
        "relays_cancelled": c.relays_cancelled,
        "duplicates": c.duplicates,
        "transmissions": c.transmissions,
        "stored": driver.state.stored,
    }


class _Idle:
    """The radio of a node without one: no links, every write refused."""

    mtu = 512

    def start(self, handler: Any) -> None:
        """Nothing will happen."""

    def send(self, peer: bytes, data: bytes) -> None:
        raise ConnectError(f"no radio to reach {peer.hex()}")

    def stop(self) -> None:
        """Nothing to stop."""
