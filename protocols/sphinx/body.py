"""What a Sphinx packet's message is, once the last hop has it: a signed envelope, a reply, or cover.

Only the last hop ever sees this (every earlier hop sees a LIONESS-garbled
block of one fixed size), so real traffic and cover look alike on every link::

    MESSAGE = 1 ‖ sender key(32, Ed25519) ‖ signature(64) ‖ SURBs length(2) ‖ 1 or 2 SURBs ‖ envelope
    REPLY   = 2 ‖ sender key(32)          ‖ signature(64) ‖ SURBs length(2) ‖ 0 or 1 SURB  ‖ envelope
                                                                                   (a REPLY is sent on a SURB)
    LOOP    = 3 ‖ loop id(16)                                                  (cover, back to its sender)
    DROP    = 4 ‖ anything                                                     (cover, thrown away)

    SURB    = first hop(16) ‖ header(HEADER_BYTES) ‖ payload key(128)

The signature is Ed25519 over ``"villagemesh-betanet-1" ‖ kind ‖ recipient node id ‖
SURB ‖ envelope``: the recipient learns the sender's *node id* (the retrier needs
it for acks and deduplication, and it is checked against the envelope's
``sender``), never its address; a body cannot be moved to another recipient or
have its SURB swapped without failing the check. A SURB lets the recipient
answer (the delivery retrier's ack, or an application's reply) without knowing
where the sender is. A message carries two SURBs when its envelope leaves room
(:data:`MAX_TWO_SURB_ENVELOPE`), one otherwise: one for the retrier's ack, one
for an application's reply; a reply that wants its own ack back carries one too.

Limits: an envelope fits in :data:`MAX_MESSAGE_ENVELOPE` (1,437 bytes) with one
SURB, :data:`MAX_TWO_SURB_ENVELOPE` (959) with two, :data:`MAX_REPLY_ENVELOPE`
(1,915) in a reply without one. Larger envelopes are for another transport (the
retrier fails over).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

from ..discovery import NODE_ID_BYTES, PUBLIC_KEY_BYTES, SIGNATURE_BYTES, node_id_from_public_key
from .crypto import LIONESS_KEY_BYTES
from .packet import HEADER_BYTES, MAX_MESSAGE, Surb

__all__ = [
    "LOOP_ID_BYTES",
    "MAX_MESSAGE_ENVELOPE",
    "MAX_REPLY_ENVELOPE",
    "MAX_TWO_SURB_ENVELOPE",
    "SURB_BYTES",
    "BodyKind",
    "Drop",
    "Loop",
    "Signed",
    "decode_body",
    "decode_surb",
    "encode_drop",
    "encode_loop",
    "encode_message",
    "encode_reply",
    "encode_surb",
]

CONTEXT = b"villagemesh-betanet-1"
"""What every body signature starts with: a signature over anything else is never one of these."""

SURB_BYTES = NODE_ID_BYTES + HEADER_BYTES + LIONESS_KEY_BYTES
LOOP_ID_BYTES = 16
_SIGNED_HEAD = 1 + PUBLIC_KEY_BYTES + SIGNATURE_BYTES
MAX_MESSAGE_ENVELOPE = MAX_MESSAGE - _SIGNED_HEAD - 2 - SURB_BYTES
MAX_TWO_SURB_ENVELOPE = MAX_MESSAGE_ENVELOPE - SURB_BYTES
MAX_REPLY_ENVELOPE = MAX_MESSAGE - _SIGNED_HEAD - 2


class BodyKind(enum.IntEnum):
    MESSAGE = 1
    REPLY = 2
    LOOP = 3
    DROP = 4


@dataclass(frozen=True, slots=True)
class Signed:
    """A MESSAGE (with the SURBs to answer on) or a REPLY (with none or one), its signer verified."""

    kind: BodyKind
    sender: str
    envelope: bytes
    surbs: tuple[Surb, ...]


@dataclass(frozen=True, slots=True)
class Loop:
    """A loop cover packet came back: ``loop_id`` is the one its sender put in."""

    loop_id: bytes


@dataclass(frozen=True, slots=True)
class Drop:
    """A drop cover packet: nothing to do but count it."""


def encode_surb(surb: Surb) -> bytes:
    """A SURB's bytes (:data:`SURB_BYTES`)."""
    if len(surb.first_hop) != NODE_ID_BYTES or len(surb.header) != HEADER_BYTES or len(surb.key) != LIONESS_KEY_BYTES:
        raise LocalProtocolError(f"betanet: a SURB is a {NODE_ID_BYTES}-byte hop, a header and a 128-byte key")
    return surb.first_hop + surb.header + surb.key


def decode_surb(data: bytes) -> Surb:
    """The SURB in ``data``; :class:`RemoteProtocolError` if it is not :data:`SURB_BYTES` long."""
    if len(data) != SURB_BYTES:
        raise RemoteProtocolError(f"betanet: a SURB is {SURB_BYTES} bytes, got {len(data)}")
    return Surb(data[:NODE_ID_BYTES], data[NODE_ID_BYTES : NODE_ID_BYTES + HEADER_BYTES], data[-LIONESS_KEY_BYTES:])


def _signed(kind: BodyKind, key: nacl.signing.SigningKey, recipient: str, surb: bytes, envelope: bytes) -> bytes:
    try:
        to = bytes.fromhex(recipient)
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(f"betanet: recipient must be a node id (hex), got {recipient!r}") from exc
    if len(to) != NODE_ID_BYTES:
        raise LocalProtocolError(f"betanet: recipient must be a {NODE_ID_BYTES}-byte node id, got {recipient!r}")
    signature = key.sign(CONTEXT + bytes([kind]) + to + surb + envelope).signature
    return bytes([kind]) + bytes(key.verify_key) + signature


def encode_message(key: nacl.signing.SigningKey, recipient: str, envelope: bytes, *surbs: Surb) -> bytes:
    """A MESSAGE body: ``envelope`` for ``recipient``, signed by ``key``, with one or two SURBs to answer on."""
    if not 1 <= len(surbs) <= 2:
        raise LocalProtocolError(f"betanet: a message carries 1 or 2 SURBs, got {len(surbs)}")
    room = MAX_MESSAGE_ENVELOPE - (len(surbs) - 1) * SURB_BYTES
    if len(envelope) > room:
        raise LocalProtocolError(
            f"betanet: an envelope with {len(surbs)} SURB(s) holds at most {room} bytes, got {len(envelope)}"
        )
    return _with_surbs(BodyKind.MESSAGE, key, recipient, envelope, surbs)


def encode_reply(key: nacl.signing.SigningKey, recipient: str, envelope: bytes, surb: Surb | None = None) -> bytes:
    """A REPLY body: ``envelope`` for the SURB's creator ``recipient``, signed by ``key``, with a SURB back or not."""
    room = MAX_REPLY_ENVELOPE - (0 if surb is None else SURB_BYTES)
    if len(envelope) > room:
        raise LocalProtocolError(f"betanet: this reply holds at most {room} bytes, got {len(envelope)}")
    return _with_surbs(BodyKind.REPLY, key, recipient, envelope, () if surb is None else (surb,))


def _with_surbs(
    kind: BodyKind, key: nacl.signing.SigningKey, recipient: str, envelope: bytes, surbs: tuple[Surb, ...]
) -> bytes:
    raw = b"".join(encode_surb(surb) for surb in surbs)
    return _signed(kind, key, recipient, raw, envelope) + len(raw).to_bytes(2, "big") + raw + envelope


def encode_loop(loop_id: bytes) -> bytes:
    """A LOOP cover body."""
    if len(loop_id) != LOOP_ID_BYTES:
        raise LocalProtocolError(f"betanet: a loop id is {LOOP_ID_BYTES} bytes, got {len(loop_id)}")
    return bytes([BodyKind.LOOP]) + loop_id


def encode_drop(filler: bytes = b"") -> bytes:
    """A DROP cover body."""
    return bytes([BodyKind.DROP]) + filler


def decode_body(body: bytes, recipient: str) -> Signed | Loop | Drop:
    """The body a last hop ``recipient`` (its node id) received; :class:`RemoteProtocolError` if it is not valid.

    A MESSAGE or REPLY must be signed for ``recipient``; its ``sender`` is the
    node id of the key that signed it.
    """
    if not body:
        raise RemoteProtocolError("betanet: an empty body")
    kind = body[0]
    if kind == BodyKind.LOOP:
        if len(body) != 1 + LOOP_ID_BYTES:
            raise RemoteProtocolError(f"betanet: a loop body is {1 + LOOP_ID_BYTES} bytes, got {len(body)}")
        return Loop(body[1:])
    if kind == BodyKind.DROP:
        return Drop()
    if kind not in (BodyKind.MESSAGE, BodyKind.REPLY):
        raise RemoteProtocolError(f"betanet: unknown body kind {kind}")
    if len(body) < _SIGNED_HEAD:
        raise RemoteProtocolError(f"betanet: a signed body is at least {_SIGNED_HEAD} bytes, got {len(body)}")
    public_key = body[1 : 1 + PUBLIC_KEY_BYTES]
    signature = body[1 + PUBLIC_KEY_BYTES : _SIGNED_HEAD]
    rest = body[_SIGNED_HEAD:]
    surb_size = int.from_bytes(rest[:2], "big") if len(rest) >= 2 else -1
    allowed = (SURB_BYTES, 2 * SURB_BYTES) if kind == BodyKind.MESSAGE else (0, SURB_BYTES)
    if surb_size not in allowed or len(rest) < 2 + surb_size:
        raise RemoteProtocolError(f"betanet: a {BodyKind(kind).name.lower()} body carries a SURB length of {allowed}")
    raw_surb, rest = rest[2 : 2 + surb_size], rest[2 + surb_size :]
    try:
        nacl.signing.VerifyKey(public_key).verify(
            CONTEXT + bytes([kind]) + bytes.fromhex(recipient) + raw_surb + rest, signature
        )
    except nacl.exceptions.CryptoError as exc:
        raise RemoteProtocolError(f"betanet: the body's signature does not verify for recipient {recipient}") from exc
    surbs = tuple(decode_surb(raw_surb[i : i + SURB_BYTES]) for i in range(0, len(raw_surb), SURB_BYTES))
    return Signed(BodyKind(kind), node_id_from_public_key(public_key), rest, surbs)
