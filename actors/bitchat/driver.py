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
untrusted, and a bad frame must not stop the node. A packet bigger than the
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
    ) -> None:
        self.me = me
        self.radio = radio
        self.rng = rng
        self.state = MeshState(me, rng, config)
        self.reassembler = Reassembler(limits)
        self.on_deliver = on_deliver
        self.on_announce = on_announce
        self.refused: Counter[str] = Counter()
        """Dropped input, by reason: ``frame``, ``announce``, ``fragment``; and ``send`` for writes to a gone link."""
        self.keys: dict[bytes, bytes] = {}
        """Peer id -> Ed25519 key, from verified announces."""

    def handle(self, event: RadioEvent, now: float) -> None:
        """One event from the radio."""
        if isinstance(event, Frame):
            try:
                packet = decode(event.data)
            except RemoteProtocolError:
                self.refused["frame"] += 1
                return
            self._execute(self.state.receive(packet, event.peer, now), now)
        elif isinstance(event, LinkUp):
            self._execute(self.state.link_up(event.peer, now), now)
        elif isinstance(event, LinkDown):
            self.state.link_down(event.peer)

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
            announcement = decode_announcement(packet.payload)
            verify(packet, announcement.signing_public_key)
            if peer_id(announcement.noise_public_key) != packet.sender_id:
                raise RemoteProtocolError(f"announce from {packet.sender_id.hex()} names another Noise key")
        except RemoteProtocolError:
            self.refused["announce"] += 1
            return
        self.keys[packet.sender_id] = announcement.signing_public_key
        self.state.learn_neighbours(packet.sender_id, announcement.neighbours or ())
        if self.on_announce is not None:
            self.on_announce(packet, announcement)
