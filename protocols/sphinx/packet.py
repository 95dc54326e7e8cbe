"""Sphinx packets (Danezis and Goldberg 2009) for BetaNet: build, unwrap one hop, reply by SURB.

A packet has one fixed size at every hop, whatever the path's length or a
node's position on it::

    packet  = header ‖ payload                                            PACKET_BYTES = 334 + 2,048
    header  = version(1) ‖ epoch(4) ‖ α(32) ‖ β(MAX_HOPS × HOP_BYTES) ‖ γ(32)  HEADER_BYTES = 334
    hop     = command(1) ‖ node id(16) ‖ delay ms(4, big-endian) ‖ next γ(32)   HOP_BYTES = 53
    payload = LIONESS layers over  zero tag(32) ‖ length(2) ‖ message ‖ zero padding

α is the sender's ephemeral X25519 point, blinded at every hop; β the routing
information, one layer of ChaCha20 per hop; γ a MAC (keyed BLAKE2b-256) over
``version ‖ epoch ‖ α ‖ β``, so a flipped bit anywhere in the header, α's ignored
top bit included, fails at the next hop.

The *epoch* (a number the network's clock gives, e.g. hours since 1970) goes
into every key a hop derives, and is covered by the MAC: a mix accepts a
packet only for the epochs it names (:func:`unwrap`'s ``epochs``, the current
one and the one before), so its replay cache need only hold the tags of those
epochs. A replay from an older epoch is refused by its epoch, never by a tag
the cache had to forget.

Processing at a hop holding secret ``x`` (:func:`unwrap`), in this order::

    epoch one this mix accepts?           else refused
    s = X25519(x, α)                      low-order α: refused
    keys = KDF(s, epoch): mac, stream, nonce, payload (LIONESS), blinding, replay tag
    γ == MAC(mac, version ‖ epoch ‖ α ‖ β)  else refused (constant-time compare)
    replay tag seen before?               refused; checked only after the MAC, so garbage
                                          cannot fill the cache
    B = (β ‖ 0^HOP_BYTES) XOR stream      B[:HOP_BYTES] is this hop's command, B[HOP_BYTES:] the next β
    δ' = LIONESS⁻¹(payload key, δ)
    RELAY:   α' = X25519(blinding, α); forward version ‖ α' ‖ β' ‖ next γ ‖ δ' after the delay
    DELIVER: zero tag of δ' checked (a payload changed on the way fails here), message out
    DELIVER with a SURB id: the payload is for the SURB's creator to open (:meth:`SurbKeys.open`)

The sender (:func:`create_packet`) computes every hop's secret by chaining
X25519 (``s_i = X25519(b_{i-1}, … X25519(b_0, X25519(x, pk_i)))``, the same
point hop ``i`` reaches as ``X25519(x_i, α_i)``), builds the *filler* so that the
pseudo-random tail each hop appends is already MAC-correct, builds β from the
last hop back, and wraps the payload in LIONESS once per hop in reverse. The
unused part of β is random, never zero (Kuhn, Beck and Strufe 2020: zero padding
tells the exit the path's length). Delays are chosen by the sender (Poisson
mixing: draw each from an exponential distribution) and carried in the header.

A SURB (single-use reply block, :func:`create_surb`) is a header to its
creator, its first hop and a payload key; the replier wraps its message with
that key (:func:`surb_reply`); every hop processes it as any packet (replies
and forward packets look alike); the creator undoes the hops' layers with the
:class:`SurbKeys` it kept, once.

Limits, each with its reason::

    MAX_HOPS        5        the anonymity gained past 5 mixes is small, the cost linear
    PAYLOAD_BYTES   2,048    one size for every packet (a size class would tell sizes apart)
    MAX_DELAY_MS    600,000  a sender-chosen delay above 10 min is a memory attack on the mix
    MAX_MESSAGE     2,014    what a payload holds after its tag and length

What this module cannot do, by construction: hide timing. A relay that
forwards at once, or a network with one packet in flight, is linkable by
timing whatever the cryptography; delays and cover traffic are the relay
actor's work, with the delays the sender chose here.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

from ..framing import NEED_DATA, NeedData
from .crypto import (
    KEY_BYTES,
    LIONESS_KEY_BYTES,
    NONCE_BYTES,
    kdf,
    lioness_decrypt,
    lioness_encrypt,
    stream_xor,
    x25519,
    x25519_base,
    xor,
)

__all__ = [
    "HEADER_BYTES",
    "HOP_BYTES",
    "MAX_DELAY_MS",
    "MAX_EPOCH",
    "MAX_HOPS",
    "MAX_MESSAGE",
    "NODE_ID_BYTES",
    "PACKET_BYTES",
    "PAYLOAD_BYTES",
    "VERSION",
    "Command",
    "Deliver",
    "Forward",
    "Hop",
    "HopGeometry",
    "OpenedHeader",
    "PacketReader",
    "ReplayCache",
    "Surb",
    "SurbKeys",
    "SurbReply",
    "create_packet",
    "create_surb",
    "open_header",
    "surb_reply",
    "unwrap",
]

VERSION = 1
NODE_ID_BYTES = 16
MAX_HOPS = 5
HOP_BYTES = 1 + NODE_ID_BYTES + 4 + KEY_BYTES
BETA_BYTES = MAX_HOPS * HOP_BYTES
EPOCH_BYTES = 4
HEADER_BYTES = 1 + EPOCH_BYTES + KEY_BYTES + BETA_BYTES + KEY_BYTES
MAX_EPOCH = 2**32 - 1
PAYLOAD_BYTES = 2048
PACKET_BYTES = HEADER_BYTES + PAYLOAD_BYTES
TAG_BYTES = 32
MAX_MESSAGE = PAYLOAD_BYTES - TAG_BYTES - 2
MAX_DELAY_MS = 600_000
SURB_ID_BYTES = 16

_ZERO_TAG = bytes(TAG_BYTES)
_NO_SURB = bytes(SURB_ID_BYTES)


class Command(enum.IntEnum):
    """What a hop's routing block tells it to do."""

    RELAY = 1
    DELIVER = 2


@dataclass(frozen=True, slots=True)
class Hop:
    """One node on a path: its 16-byte node id and its X25519 public key (32 bytes)."""

    node_id: bytes
    public_key: bytes


@dataclass(frozen=True, slots=True)
class Forward:
    """Unwrapped at a mix: send ``packet`` to ``next_node`` after ``delay_ms``; ``tag`` went into the cache."""

    next_node: bytes
    delay_ms: int
    packet: bytes
    tag: bytes
    epoch: int


@dataclass(frozen=True, slots=True)
class Deliver:
    """Unwrapped at the last hop: ``message`` is for this node."""

    message: bytes
    tag: bytes
    epoch: int


@dataclass(frozen=True, slots=True)
class SurbReply:
    """Unwrapped at the last hop: a reply to this node's SURB ``surb_id``; open ``payload`` with its keys."""

    surb_id: bytes
    payload: bytes
    tag: bytes
    epoch: int


@dataclass(frozen=True, slots=True)
class Surb:
    """What a replier needs: the header to the creator, the first hop to send it to, the payload key."""

    first_hop: bytes
    header: bytes
    key: bytes


@dataclass(frozen=True, slots=True)
class SurbKeys:
    """What the creator keeps to open the reply: the SURB id, its key and each hop's payload key."""

    surb_id: bytes
    key: bytes
    hop_keys: tuple[bytes, ...]

    def open(self, reply: SurbReply) -> bytes:
        """The replier's message; :class:`RemoteProtocolError` if it was changed on the way or is not for this SURB."""
        if reply.surb_id != self.surb_id:
            raise LocalProtocolError(f"sphinx: reply for SURB {reply.surb_id.hex()} opened with {self.surb_id.hex()}")
        payload = reply.payload
        for key in reversed(self.hop_keys):
            payload = lioness_encrypt(key, payload)
        return _open_body(lioness_decrypt(self.key, payload))


@dataclass(frozen=True, slots=True)
class _Keys:
    mac: bytes
    stream: bytes
    nonce: bytes
    payload: bytes
    blinding: bytes
    tag: bytes


def _keys(shared: bytes, epoch: int) -> _Keys:
    secret = kdf(shared, b"epoch" + epoch.to_bytes(EPOCH_BYTES, "big"), KEY_BYTES)
    payload = kdf(secret, b"payload-a", 64) + kdf(secret, b"payload-b", 64)
    return _Keys(
        mac=kdf(secret, b"mac", KEY_BYTES),
        stream=kdf(secret, b"stream", KEY_BYTES),
        nonce=kdf(secret, b"nonce", NONCE_BYTES),
        payload=payload[:LIONESS_KEY_BYTES],
        blinding=kdf(secret, b"blinding", KEY_BYTES),
        tag=kdf(secret, b"replay", KEY_BYTES),
    )


def _mac(keys: object, data: bytes) -> bytes:
    """γ over ``data`` (``version ‖ epoch ‖ α ‖ β``): keyed BLAKE2b-256; the sender's and every hop's."""
    return hashlib.blake2b(data, key=cast(_Keys, keys).mac, digest_size=KEY_BYTES).digest()


def _ad(epoch: int) -> bytes:
    """The header's associated data: version and epoch."""
    return bytes([VERSION]) + epoch.to_bytes(EPOCH_BYTES, "big")


def _stream(keys: _Keys, size: int) -> bytes:
    return stream_xor(keys.stream, keys.nonce, bytes(size))


def _body(message: bytes) -> bytes:
    if len(message) > MAX_MESSAGE:
        raise LocalProtocolError(f"sphinx: a message holds at most {MAX_MESSAGE} bytes, got {len(message)}")
    return _ZERO_TAG + len(message).to_bytes(2, "big") + message + bytes(MAX_MESSAGE - len(message))


def _open_body(body: bytes) -> bytes:
    if not hmac.compare_digest(body[:TAG_BYTES], _ZERO_TAG):
        raise RemoteProtocolError("sphinx: the payload failed its integrity check (changed on the way)")
    size = int.from_bytes(body[TAG_BYTES : TAG_BYTES + 2], "big")
    if size > MAX_MESSAGE:
        raise RemoteProtocolError(f"sphinx: the payload claims {size} bytes, more than the {MAX_MESSAGE} it holds")
    return body[TAG_BYTES + 2 : TAG_BYTES + 2 + size]


def _check_path(path: Sequence[Hop], delays_ms: Sequence[int], epoch: int) -> None:
    if not isinstance(epoch, int) or not 0 <= epoch <= MAX_EPOCH:
        raise LocalProtocolError(f"sphinx: an epoch is 0 to {MAX_EPOCH}, got {epoch!r}")
    if not 1 <= len(path) <= MAX_HOPS:
        raise LocalProtocolError(f"sphinx: a path has 1 to {MAX_HOPS} hops, got {len(path)}")
    if len(delays_ms) != len(path) - 1:
        raise LocalProtocolError(f"sphinx: {len(path)} hops need {len(path) - 1} delays, got {len(delays_ms)}")
    for hop in path:
        if len(hop.node_id) != NODE_ID_BYTES or len(hop.public_key) != KEY_BYTES:
            raise LocalProtocolError(f"sphinx: hop {hop!r} needs a {NODE_ID_BYTES}-byte id and a 32-byte key")
    for delay in delays_ms:
        if not 0 <= delay <= MAX_DELAY_MS:
            raise LocalProtocolError(f"sphinx: a delay is 0 to {MAX_DELAY_MS} ms, got {delay!r}")


def _header(
    path: Sequence[Hop], delays_ms: Sequence[int], final: bytes, epoch: int, random_bytes: Callable[[int], bytes]
) -> tuple[bytes, list[_Keys]]:
    """The header for ``path`` whose last block is ``final`` (HOP_BYTES), and every hop's keys."""
    _check_path(path, delays_ms, epoch)
    ad = _ad(epoch)
    secret = random_bytes(KEY_BYTES)
    alpha = x25519_base(secret)
    alphas: list[bytes] = []
    keys: list[_Keys] = []
    blindings: list[bytes] = []
    for hop in path:
        shared = x25519(secret, hop.public_key)
        for blinding in blindings:
            shared = x25519(blinding, shared)
        hop_keys = _keys(shared, epoch)
        alphas.append(alpha)
        keys.append(hop_keys)
        blindings.append(hop_keys.blinding)
        alpha = x25519(hop_keys.blinding, alpha)
    filler = b""
    for hop_keys in keys[:-1]:
        stream = _stream(hop_keys, BETA_BYTES + HOP_BYTES)
        filler = xor(filler + bytes(HOP_BYTES), stream[BETA_BYTES - len(filler) :])
    last = keys[-1]
    plain = final + random_bytes(BETA_BYTES - HOP_BYTES - len(filler))
    beta = xor(plain, _stream(last, len(plain))) + filler
    gamma = _mac(last, ad + alphas[-1] + beta)
    for i in range(len(path) - 2, -1, -1):
        block = bytes([Command.RELAY]) + path[i + 1].node_id + delays_ms[i].to_bytes(4, "big") + gamma
        beta = xor(block + beta[: BETA_BYTES - HOP_BYTES], _stream(keys[i], BETA_BYTES))
        gamma = _mac(keys[i], ad + alphas[i] + beta)
    return ad + alphas[0] + beta + gamma, keys


def _final_block(surb_id: bytes, random_bytes: Callable[[int], bytes]) -> bytes:
    return bytes([Command.DELIVER]) + surb_id + random_bytes(HOP_BYTES - 1 - SURB_ID_BYTES)


def create_packet(
    path: Sequence[Hop],
    message: bytes,
    delays_ms: Sequence[int],
    *,
    epoch: int,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """A packet carrying ``message`` along ``path`` (the last hop is the recipient), to send to ``path[0]``.

    ``delays_ms[i]`` is how long hop ``i`` holds it before forwarding (one fewer
    than the hops). ``random_bytes`` gives the ephemeral key and the padding
    (``os.urandom``; a seeded source makes packets reproducible in tests).
    ``epoch`` is the sender's current epoch (every hop must still accept it).
    """
    header, keys = _header(path, delays_ms, _final_block(_NO_SURB, random_bytes), epoch, random_bytes)
    payload = _body(message)
    for hop_keys in reversed(keys):
        payload = lioness_encrypt(hop_keys.payload, payload)
    return header + payload


def create_surb(
    path: Sequence[Hop], delays_ms: Sequence[int], *, epoch: int, random_bytes: Callable[[int], bytes] = os.urandom
) -> tuple[Surb, SurbKeys]:
    """A reply block along ``path`` (whose last hop is its creator), and the keys the creator keeps.

    It is good while the hops accept ``epoch`` (the current and the next epoch, at most).
    """
    surb_id = random_bytes(SURB_ID_BYTES)
    header, keys = _header(path, delays_ms, _final_block(surb_id, random_bytes), epoch, random_bytes)
    key = random_bytes(LIONESS_KEY_BYTES)
    return Surb(path[0].node_id, header, key), SurbKeys(surb_id, key, tuple(k.payload for k in keys))


def surb_reply(surb: Surb, message: bytes) -> tuple[bytes, bytes]:
    """``(first hop, packet)``: ``message`` as a reply on ``surb`` (use a SURB once: hops refuse a second)."""
    if len(surb.header) != HEADER_BYTES or len(surb.key) != LIONESS_KEY_BYTES:
        raise LocalProtocolError(f"sphinx: a SURB has a {HEADER_BYTES}-byte header and a 128-byte key")
    return surb.first_hop, surb.header + lioness_encrypt(surb.key, _body(message))


class ReplayCache:
    """Replay tags seen under one routing key, bounded.

    A tag is the hop's KDF output from the shared secret, so any copy of a
    packet (however its α was re-encoded) has the same tag. When the cache is
    full it refuses more (:class:`LocalProtocolError`) rather than forget a tag
    (forgetting would let that packet through again): the relay must then move
    to a new routing key and :meth:`clear` the cache, which is also what an
    epoch change does.
    """

    def __init__(self, capacity: int = 1_000_000) -> None:
        if capacity < 1:
            raise LocalProtocolError(f"sphinx: a replay cache holds at least one tag, got capacity {capacity!r}")
        self.capacity = capacity
        self._seen: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, tag: bytes) -> None:
        """Remember ``tag``; :class:`RemoteProtocolError` if it was seen (a replay)."""
        if tag in self._seen:
            raise RemoteProtocolError(f"sphinx: replayed packet (tag {tag[:8].hex()}…)")
        if len(self._seen) >= self.capacity:
            raise LocalProtocolError(f"sphinx: the replay cache is full ({self.capacity} tags): rotate the key")
        self._seen.add(tag)

    def clear(self) -> None:
        """Forget every tag: only together with a new routing key."""
        self._seen.clear()


@dataclass(frozen=True, slots=True)
class HopGeometry:
    """Where a Sphinx header's parts sit, and the primitives a hop derives and checks them with.

    ``derive(shared secret, ad, context)`` gives the hop's keys; ``mac(keys, data)``
    the header MAC; ``keystream(keys, n)`` n bytes of the routing stream;
    ``blinding(keys)`` the scalar α is blinded by. :data:`OURS` is this format's;
    a test runs another format's published packets (Katzenpost's) through
    :func:`open_header` with that format's primitives.
    """

    ad_bytes: int
    beta_bytes: int
    hop_bytes: int
    derive: Callable[[bytes, bytes, object], object]
    mac: Callable[[object, bytes], bytes]
    keystream: Callable[[object, int], bytes]
    blinding: Callable[[object], bytes]


@dataclass(frozen=True, slots=True)
class OpenedHeader:
    """One hop's view of a header whose MAC held: its keys, its routing block, the next β, and α."""

    keys: Any
    block: bytes
    next_beta: bytes
    alpha: bytes
    geometry: HopGeometry

    def next_alpha(self) -> bytes:
        """α blinded for the next hop."""
        return x25519(self.geometry.blinding(self.keys), self.alpha)


def open_header(header: bytes, secret: bytes, geometry: HopGeometry, context: object = None) -> OpenedHeader:
    """The Sphinx hop, format-agnostic: DH with α, derive the keys, check γ over ``ad ‖ α ‖ β``, decrypt β.

    ``(β ‖ 0^hop) XOR keystream``: its first ``hop_bytes`` are this hop's block,
    the rest the next β (the appended zeros become the pseudo-random tail).
    Raises :class:`RemoteProtocolError` for a low-order α or a MAC that does not match.
    """
    g = geometry
    alpha = header[g.ad_bytes : g.ad_bytes + KEY_BYTES]
    beta_at = g.ad_bytes + KEY_BYTES
    beta = header[beta_at : beta_at + g.beta_bytes]
    gamma = header[beta_at + g.beta_bytes : beta_at + g.beta_bytes + KEY_BYTES]
    keys = g.derive(x25519(secret, alpha), header[: g.ad_bytes], context)
    if not hmac.compare_digest(gamma, g.mac(keys, header[:beta_at] + beta)):
        raise RemoteProtocolError("sphinx: the header's MAC does not match (changed on the way, or not for this key)")
    routing = xor(beta + bytes(g.hop_bytes), g.keystream(keys, g.beta_bytes + g.hop_bytes))
    return OpenedHeader(keys, routing[: g.hop_bytes], routing[g.hop_bytes :], alpha, g)


OURS = HopGeometry(
    ad_bytes=1 + EPOCH_BYTES,
    beta_bytes=BETA_BYTES,
    hop_bytes=HOP_BYTES,
    derive=lambda shared, ad, epoch: _keys(shared, cast(int, epoch)),
    mac=_mac,
    keystream=lambda keys, size: _stream(cast(_Keys, keys), size),
    blinding=lambda keys: cast(_Keys, keys).blinding,
)
"""This format's geometry and primitives."""


def unwrap(
    packet: bytes, secret: bytes, replay: ReplayCache | Mapping[int, ReplayCache]
) -> Forward | Deliver | SurbReply:
    """Process ``packet`` at the hop whose X25519 secret is ``secret``; the tag goes into a replay cache.

    ``replay`` maps each epoch this mix accepts to that epoch's cache (a single
    cache accepts any epoch: for tests and tools). The result's ``epoch`` says
    which one the packet named.

    Raises :class:`RemoteProtocolError` for any packet to drop: wrong size or
    version, an epoch not accepted, low-order α, a header changed anywhere, a
    replay, an unknown command, an absurd delay, a payload changed on the way.
    """
    if not isinstance(packet, bytes | bytearray) or len(packet) != PACKET_BYTES:
        raise RemoteProtocolError(f"sphinx: a packet is {PACKET_BYTES} bytes, got {_size(packet)}")
    packet = bytes(packet)
    if packet[0] != VERSION:
        raise RemoteProtocolError(f"sphinx: unknown packet version {packet[0]}")
    epoch = int.from_bytes(packet[1 : 1 + EPOCH_BYTES], "big")
    if isinstance(replay, ReplayCache):
        cache = replay
    elif (found := replay.get(epoch)) is not None:
        cache = found
    else:
        raise RemoteProtocolError(f"sphinx: epoch {epoch} is not one this mix accepts ({sorted(replay)})")
    at = 1 + EPOCH_BYTES
    hop = open_header(packet[:HEADER_BYTES], secret, OURS, epoch)
    keys = hop.keys
    cache.add(keys.tag)
    payload = lioness_decrypt(keys.payload, packet[HEADER_BYTES:])
    routing = hop.block
    command = routing[0]
    if command == Command.RELAY:
        next_node = routing[1 : 1 + NODE_ID_BYTES]
        delay = int.from_bytes(routing[1 + NODE_ID_BYTES : 5 + NODE_ID_BYTES], "big")
        if delay > MAX_DELAY_MS:
            raise RemoteProtocolError(f"sphinx: a delay of {delay} ms is above the {MAX_DELAY_MS} ms allowed")
        next_gamma = routing[5 + NODE_ID_BYTES : HOP_BYTES]
        header = packet[:at] + hop.next_alpha() + hop.next_beta + next_gamma
        return Forward(next_node, delay, header + payload, keys.tag, epoch)
    if command == Command.DELIVER:
        surb_id = routing[1 : 1 + SURB_ID_BYTES]
        if surb_id != _NO_SURB:
            return SurbReply(surb_id, payload, keys.tag, epoch)
        return Deliver(_open_body(payload), keys.tag, epoch)
    raise RemoteProtocolError(f"sphinx: unknown routing command {command}")


def _size(value: object) -> str:
    return f"{len(value)} bytes" if isinstance(value, bytes | bytearray) else type(value).__name__


class PacketReader:
    """Fixed-size packets out of a byte stream (a link between mixes carries them back to back).

    ``receive_data(chunk)`` then ``next_packet()`` until :data:`NEED_DATA`; it
    holds less than one packet between calls.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def next_packet(self) -> bytes | NeedData:
        if len(self._buffer) < PACKET_BYTES:
            return NEED_DATA
        packet = bytes(self._buffer[:PACKET_BYTES])
        del self._buffer[:PACKET_BYTES]
        return packet
