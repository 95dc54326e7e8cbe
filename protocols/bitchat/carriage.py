"""villagemesh envelopes inside BitChat packets: type 0x56 ('V'), signed by the node key.

BitChat clients relay packet types they do not know (the relay reads only the
header), so a villagemesh :class:`~villagemesh.protocols.envelope.Message`
crosses a BitChat mesh as one packet of type :data:`.packet.MessageType.VILLAGEMESH`::

    payload = Ed25519 public key of the sending node (32) | encode_message(envelope)

and the packet is signed (BitChat's packet signature, :func:`.packet.sign`) by
that key. :func:`unwrap` verifies the signature against the key in the payload
and refuses an envelope whose ``sender`` is not the node id of that key
(:func:`villagemesh.protocols.discovery.node_id_from_public_key`): the sender a
handler sees is the verified signer, whoever relayed the packet. The packet's
BitChat ``sender_id`` stays the node's BitChat peer id (from its Noise key), which
its signed announce binds to the same Ed25519 key.
"""

from __future__ import annotations

from nacl.signing import SigningKey

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

from ..discovery import node_id_from_public_key
from ..envelope import Message, decode_message, encode_message
from .packet import DEFAULT_TTL, MessageType, Packet, sign, verify

__all__ = ["KEY_BYTES", "V1_MAX_PAYLOAD", "unwrap", "wrap"]

KEY_BYTES = 32
"""The signer's Ed25519 public key at the front of the payload."""
V1_MAX_PAYLOAD = 0xFF00
"""Payloads up to this size go in a v1 packet (2-byte length, room for the compressed-size prefix), larger in v2."""


def wrap(
    message: Message,
    key: SigningKey,
    sender_id: bytes,
    timestamp: int,
    *,
    recipient_id: bytes | None = None,
    ttl: int = DEFAULT_TTL,
) -> Packet:
    """A signed 0x56 packet carrying ``message``.

    Raises:
        LocalProtocolError: ``message.sender`` is not the node id of ``key``.
    """
    public = bytes(key.verify_key)
    if message.sender != node_id_from_public_key(public):
        raise LocalProtocolError(
            f"envelope sender {message.sender!r} is not the node id of the signing key {public.hex()}"
        )
    payload = public + encode_message(message)
    packet = Packet(
        type=MessageType.VILLAGEMESH,
        sender_id=sender_id,
        timestamp=timestamp,
        payload=payload,
        ttl=ttl,
        version=1 if len(payload) <= V1_MAX_PAYLOAD else 2,
        recipient_id=recipient_id,
    )
    return sign(packet, key)


def unwrap(packet: Packet) -> Message:
    """The envelope of a 0x56 packet, once its signature and sender check out.

    Raises:
        RemoteProtocolError: another type, no key, a bad signature, a bad
            envelope, or an envelope sender that is not the signer.
    """
    if packet.type != MessageType.VILLAGEMESH:
        raise RemoteProtocolError(f"packet type 0x{packet.type:02x} does not carry a villagemesh envelope")
    if len(packet.payload) < KEY_BYTES:
        raise RemoteProtocolError(f"villagemesh payload of {len(packet.payload)} bytes has no signer key")
    public = packet.payload[:KEY_BYTES]
    verify(packet, public)
    message = decode_message(packet.payload[KEY_BYTES:])
    if message.sender != node_id_from_public_key(public):
        raise RemoteProtocolError(
            f"envelope sender {message.sender!r} is not its signer {node_id_from_public_key(public)}"
        )
    return message
