"""One BitChat node's plumbing between a radio and the pure relay logic; single-threaded, clock given.

:class:`MeshDriver` is what the actor (and the in-memory simulation) runs: radio
events in, :class:`~.state.MeshState` decisions out, carried out on the radio::

    Frame(peer, data) ─▶ decode ─▶ MeshState.receive ─▶ Send ─▶ frame / fragment ─▶ radio.send
                                                    └─▶ Deliver ─▶ fragment? ─▶ Reassembler ─▶ whole packet
                                                                   announce? ─▶ verify ─▶ learn neighbours, on_announce
                                                                   otherwise ─▶ on_deliver
    LinkUp / LinkDown ─▶ MeshState.link_up / link_down (kept packets go out)
    tick(now) ─▶ due relays, expired reassemblies

A frame that does not decode, an announce whose signature or peer id does not
check out, or fragments that break the reassembler's limits are counted in
:attr:`MeshDriver.refused` (by reason) and dropped: bytes from a radio are
untrusted, and a bad frame must not stop the node.

**Checked before the seen-set.** BitChat's duplicate key (sender, timestamp,
type, 4 bytes of the payload's hash) does not cover the signature, so a forged
copy heard first would get the genuine packet dropped as its duplicate. A
packet is therefore screened *before* :meth:`MeshState.receive` records it:

- an announce (0x01) must verify against the key it carries and name the peer
  id of its Noise key (else ``announce``); a villagemesh packet (0x56) must
  verify against the key at the head of its payload; any other signed packet
  whose sender's key we learned from a verified announce must verify against
  it (else ``signature``). A signed packet from a sender we know no key for
  passes unchecked (it may be relayed; nothing trusts it);
- with the wall clock given (``handle(event, now, wall_ms)``), an announce
  (0x01, or a villagemesh announce) whose timestamp is more than
  ``announce_max_age`` (240 s) behind it or ``announce_max_ahead`` (60 s)
  ahead is a replay or a lie (``stale``): Cure53's BCH-01-011 on BitChat
  Android, which accepted announces an hour old. The window is no wider than
  the seen-set's memory (``seen_max_age``, 300 s, checked by
  :class:`MeshConfig`), so a replay inside it is still caught as a duplicate
  (unless the LRU's ``seen_capacity`` was flooded meanwhile). Other packets are
  not windowed: store-and-forward hands directed packets over up to
  ``store_max_age`` late, and a villagemesh envelope carries its own expiry.

A screened-out packet never enters the seen-set: the genuine copy that comes
after it is received as new. Each refusal also goes to ``on_refused`` (the
actor logs it). A packet bigger than the
radio's MTU is fragmented on the way out (:func:`~villagemesh.protocols.bitchat.fragment_packet`),
its fragments marked seen so their echoes are not relayed back.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable

from nacl.signing import SigningKey

from villagemesh.actors.bitchat.radio import Frame, LinkDown, LinkUp, Radio, RadioEvent
from villagemesh.actors.bitchat.state import Action, Deliver, MeshConfig, MeshState
from villagemesh.errors import ConnectError, RemoteProtocolError
from villagemesh.protocols.bitchat import (
    Announcement,
    Limits,
    MessageType,
    Packet,
    Reassembler,
    decode,
    decode_announcement,
    encode_announcement,
    fragment_packet,
    frame,
    peer_id,
    sign,
    verify,
)
from villagemesh.protocols.bitchat.announce import MAX_NEIGHBOURS

__all__ = ["MeshDriver", "make_announce"]

OnDeliver = Callable[[Packet, bytes], None]
OnAnnounce = Callable[[Packet, Announcement], None]
OnRefused = Callable[[str, Packet, bytes], None]
"""(reason, packet, link) of a packet screened out before the seen-set."""
ANNOUNCE_TYPES = frozenset({MessageType.ANNOUNCE, MessageType.VILLAGEMESH_ANNOUNCE})
"""The types whose timestamps are windowed (presence must be fresh)."""


def make_announce(
    signing_key: SigningKey, noise_public: bytes, nickname: str, neighbours: Iterable[bytes], timestamp: int
) -> Packet:
    """Our signed announce (type 0x01, TTL 7, no recipient), naming up to 10 direct neighbours."""
    announcement = Announcement(
        nickname=nickname,
        noise_public_key=noise_public,
        signing_public_key=bytes(signing_key.verify_key),
        neighbours=tuple(sorted(neighbours))[:MAX_NEIGHBOURS],
    )
    packet = Packet(
        type=MessageType.ANNOUNCE,
        sender_id=peer_id(noise_public),
        timestamp=timestamp,
        payload=encode_announcement(announcement),
    )
    return sign(packet, signing_key)


class MeshDriver:
    """A node's radio, relay state and reassembler, driven by events and ticks.

    Args:
        me: our BitChat peer id.
        radio: the links.
        rng: jitter and fragment ids (inject a seeded ``random.Random``).
        on_deliver: called with each packet for us (whole, verified where
            signed types need it) and the neighbour it came from.
        on_announce: called with each verified announce.
        config, limits: the relay's and the reassembler's knobs.
    """

    def __init__(
        self,
        me: bytes,
        radio: Radio,
        rng: random.Random,
        on_deliver: OnDeliver,
        on_announce: OnAnnounce | None = None,
        config: MeshConfig | None = None,
        limits: Limits | None = None,
        on_refused: OnRefused | None = None,
    ) -> None:
        self.me = me
        self.radio = radio
        self.rng = rng
        self.state = MeshState(me, rng, config)
        self.reassembler = Reassembler(limits)
        self.on_deliver = on_deliver
        self.on_announce = on_announce
        self.on_refused = on_refused
        self.refused: Counter[str] = Counter()
        """Dropped input, by reason: ``frame``, ``announce``, ``fragment``; and ``send`` for writes to a gone link."""
        self.keys: dict[bytes, bytes] = {}
        """Peer id -> Ed25519 key, from verified announces."""

    def handle(self, event: RadioEvent, now: float, wall_ms: int | None = None) -> None:
        """One event from the radio; ``wall_ms``, the wall clock in ms (None: announces are not windowed)."""
        if isinstance(event, Frame):
            try:
                packet = decode(event.data)
            except RemoteProtocolError:
                self.refused["frame"] += 1
                return
            reason = self._screen(packet, wall_ms)
            if reason is not None:
                self.refused[reason] += 1
                if self.on_refused is not None:
                    self.on_refused(reason, packet, event.peer)
                return
            self._execute(self.state.receive(packet, event.peer, now), now)
        elif isinstance(event, LinkUp):
            self._execute(self.state.link_up(event.peer, now), now)
        elif isinstance(event, LinkDown):
            self.state.link_down(event.peer)

    def _screen(self, packet: Packet, wall_ms: int | None) -> str | None:
        """Why ``packet`` must not reach the seen-set; None if it may (see the module's docstring)."""
        config = self.state.config
        if packet.type in ANNOUNCE_TYPES and wall_ms is not None:
            ahead_ms = packet.timestamp - wall_ms
            if ahead_ms > config.announce_max_ahead * 1000 or -ahead_ms > config.announce_max_age * 1000:
                return "stale"
        try:
            if packet.type == MessageType.ANNOUNCE:
                _announcement(packet)
                return None
            key = self.keys.get(packet.sender_id) if packet.signature is not None else None
            if packet.type == MessageType.VILLAGEMESH:
                key = packet.payload[:32]
            if key is not None:
                verify(packet, key)
        except RemoteProtocolError:
            return "announce" if packet.type == MessageType.ANNOUNCE else "signature"
        return None

    def originate(self, packet: Packet, now: float) -> None:
        """Send our own packet into the mesh."""
        self._execute(self.state.originate(packet, now), now)

    def tick(self, now: float) -> None:
        """Send what fell due; drop reassemblies that timed out."""
        self._execute(self.state.tick(now), now)
        self.reassembler.expire(now)

    def next_deadline(self) -> float | None:
        """When :meth:`tick` is due next for a relay (None: nothing waits)."""
        return self.state.next_deadline()

    def _execute(self, actions: list[Action], now: float) -> None:
        for action in actions:
            if isinstance(action, Deliver):
                self._deliver(action.packet, action.link, now)
            else:
                self._transmit(action.packet, action.links, now)

    def _transmit(self, packet: Packet, links: tuple[bytes, ...], now: float) -> None:
        if not links:
            return
        data = frame(packet)
        frames = [data]
        if len(data) > self.radio.mtu:
            pieces = fragment_packet(packet, self.radio.mtu, self.rng.randbytes(8))
            for piece in pieces:
                self.state.mark_seen(piece, now)
            frames = [frame(piece) for piece in pieces]
        for link in links:
            for chunk in frames:
                try:
                    self.radio.send(link, chunk)
                except ConnectError:
                    self.refused["send"] += 1  # the link went away; its LinkDown is on the way
                    break

    def _deliver(self, packet: Packet, link: bytes, now: float) -> None:
        if packet.type == MessageType.FRAGMENT:
            try:
                whole = self.reassembler.receive(packet, now)
            except RemoteProtocolError:
                self.refused["fragment"] += 1
                return
            if whole is not None:
                self._deliver(whole, link, now)
            return
        if packet.type == MessageType.ANNOUNCE:
            self._announced(packet)
            return
        self.on_deliver(packet, link)

    def _announced(self, packet: Packet) -> None:
        try:
            announcement = _announcement(packet)  # again: a reassembled announce was screened as fragments only
        except RemoteProtocolError:
            self.refused["announce"] += 1
            return
        self.keys[packet.sender_id] = announcement.signing_public_key
        self.state.learn_neighbours(packet.sender_id, announcement.neighbours or ())
        if self.on_announce is not None:
            self.on_announce(packet, announcement)


def _announcement(packet: Packet) -> Announcement:
    """The announce's content, once its signature and peer id check out.

    Raises:
        RemoteProtocolError: it does not decode, verify, or name its sender's Noise key.
    """
    announcement = decode_announcement(packet.payload)
    verify(packet, announcement.signing_public_key)
    if peer_id(announcement.noise_public_key) != packet.sender_id:
        raise RemoteProtocolError(f"announce from {packet.sender_id.hex()} names another Noise key")
    return announcement
