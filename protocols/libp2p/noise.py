"""libp2p's ``/noise`` security: Noise XX with the libp2p handshake payload, sans-I/O.

The handshake is :class:`villagemesh.protocols.noise.XXHandshake` (the same
``Noise_XX_25519_ChaChaPoly_SHA256``, empty prologue); what libp2p adds is the
framing and the payload::

    every message    u16be length ‖ bytes                (handshake and transport alike)
    message 1  I→R   e                                   (empty payload)
    message 2  R→I   e, ee, s, es, ENC(payload)
    message 3  I→R   s, se, ENC(payload)
    payload          NoiseHandshakePayload{1: identity_key, 2: identity_sig}   (protobuf)
                     identity_key = PublicKey{1: Ed25519, 2: <32 bytes>}
                     identity_sig = Ed25519(b"noise-libp2p-static-key:" ‖ the sender's X25519 static key)

Each side checks the other's signature against the static key the handshake just
authenticated, and so learns its peer id (:meth:`PeerId.from_public_key_proto` of the
identity key); a dialer that asked for a peer id (the ``/p2p/`` part of the address it
dialled) refuses any other. Only Ed25519 identities are accepted (what py-, go- and
rust-libp2p use by default); the payload's other fields (extensions) are ignored.

Transport frames carry at most :data:`MAX_PLAINTEXT` bytes each (Noise's 65,535 less
the tag); :meth:`NoiseSession.send` splits larger data. Nonces are counted per direction
and the session stops for good before one would repeat.

Events from :meth:`NoiseSession.receive_data`: :class:`Authenticated` (once; the peer id
and identity key) and :class:`Data`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import cast

import nacl.exceptions
import nacl.signing

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

from ..framing import NEED_DATA, NeedData
from ..noise import TAG_BYTES, CipherState, XXHandshake
from .peerid import ED25519_KEY_PROTO_PREFIX, PeerId
from .protobuf import encode_bytes_field, parse_fields

__all__ = ["MAX_PLAINTEXT", "PROTOCOL_ID", "SIGNATURE_PREFIX", "Authenticated", "Data", "NoiseSession"]

PROTOCOL_ID = "/noise"
SIGNATURE_PREFIX = b"noise-libp2p-static-key:"
MAX_MESSAGE = 65535
MAX_PLAINTEXT = MAX_MESSAGE - TAG_BYTES
_MSG2_MIN = 32 + 48 + TAG_BYTES


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The handshake is done: the peer proved ``peer_id`` (its Ed25519 ``identity`` key)."""

    peer_id: PeerId
    identity: bytes


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes


class _State(enum.Enum):
    HANDSHAKE = "handshaking"
    TRANSPORT = "transport"
    FAILED = "failed"


def handshake_payload(identity: nacl.signing.SigningKey, static_public: bytes) -> bytes:
    """Our ``NoiseHandshakePayload``: identity key and the signature binding our static key to it."""
    key_proto = ED25519_KEY_PROTO_PREFIX + bytes(identity.verify_key)
    signature = identity.sign(SIGNATURE_PREFIX + static_public).signature
    return encode_bytes_field(1, key_proto) + encode_bytes_field(2, signature)


def verify_payload(payload: bytes, remote_static: bytes) -> tuple[PeerId, bytes]:
    """``(peer id, Ed25519 key)`` the payload proves for ``remote_static``; :class:`RemoteProtocolError` if not."""
    fields = parse_fields(payload)
    key_proto, signature = fields.get(1, [b""])[0], fields.get(2, [b""])[0]
    if not isinstance(key_proto, bytes) or not isinstance(signature, bytes):
        raise RemoteProtocolError("libp2p noise: identity_key and identity_sig must be bytes fields")
    if not key_proto.startswith(ED25519_KEY_PROTO_PREFIX) or len(key_proto) != 36:
        raise RemoteProtocolError(f"libp2p noise: only Ed25519 identity keys are accepted, got {key_proto[:8].hex()}…")
    identity = key_proto[4:]
    try:
        nacl.signing.VerifyKey(identity).verify(SIGNATURE_PREFIX + remote_static, signature)
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise RemoteProtocolError("libp2p noise: the identity signature over the static key does not verify") from exc
    return PeerId.from_public_key_proto(key_proto), identity


class NoiseSession:
    """One side of a libp2p Noise session. Make it with :meth:`initiator` or :meth:`responder`."""

    def __init__(
        self,
        *,
        initiator: bool,
        static: bytes,
        identity: nacl.signing.SigningKey,
        expected_peer: PeerId | None = None,
        ephemeral: bytes | None = None,
    ) -> None:
        self._hs = XXHandshake(initiator, static, b"", ephemeral)
        self._identity = identity
        self.expected_peer = expected_peer
        self._state = _State.HANDSHAKE
        self._in = bytearray()
        self._out: list[bytes] = []
        """Framed messages to send, joined once by :meth:`data_to_send` (not grown byte by byte)."""
        self._send: CipherState | None = None
        self._receive: CipherState | None = None
        self.remote: Authenticated | None = None
        if initiator:
            self._write(self._hs.write_message(b""))

    @classmethod
    def initiator(
        cls, static: bytes, identity: nacl.signing.SigningKey, *, expected_peer: PeerId | None = None
    ) -> NoiseSession:
        return cls(initiator=True, static=static, identity=identity, expected_peer=expected_peer)

    @classmethod
    def responder(cls, static: bytes, identity: nacl.signing.SigningKey) -> NoiseSession:
        return cls(initiator=False, static=static, identity=identity)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send(self, data: bytes) -> None:
        """Encrypt ``data`` for the peer (split into frames of at most :data:`MAX_PLAINTEXT`)."""
        if self._state is not _State.TRANSPORT or self._send is None:
            raise LocalProtocolError(f"libp2p noise: cannot send while {self._state.value}")
        view = memoryview(data)
        for at in range(0, max(len(view), 1), MAX_PLAINTEXT):
            self._write(self._send.encrypt(b"", bytes(view[at : at + MAX_PLAINTEXT])))

    def receive_data(self, data: bytes) -> list[Authenticated | Data]:
        if self._state is _State.FAILED:
            raise LocalProtocolError("libp2p noise: this session has failed")
        self._in += data
        events: list[Authenticated | Data] = []
        try:
            while (frame := self._next_frame()) is not NEED_DATA:
                events += self._on_frame(frame)
        except (RemoteProtocolError, LocalProtocolError):
            self._state = _State.FAILED
            raise
        return events

    def _next_frame(self) -> bytes | NeedData:
        if len(self._in) < 2:
            return NEED_DATA
        size = int.from_bytes(self._in[:2], "big")
        if len(self._in) < 2 + size:
            return NEED_DATA
        frame = bytes(self._in[2 : 2 + size])
        del self._in[: 2 + size]
        return frame

    def _on_frame(self, frame: bytes) -> list[Authenticated | Data]:
        if self._state is _State.TRANSPORT:
            return [Data(cast(CipherState, self._receive).decrypt(b"", frame))]
        hs = self._hs
        if not hs.initiator and hs.index == 0 and len(frame) != 32:
            raise RemoteProtocolError(f"libp2p noise: message 1 is 32 bytes, got {len(frame)}")
        if hs.initiator and len(frame) < _MSG2_MIN:
            raise RemoteProtocolError(f"libp2p noise: message 2 is at least {_MSG2_MIN} bytes, got {len(frame)}")
        payload = hs.read_message(frame)
        if hs.index == 1:  # the responder read message 1: answer with message 2
            self._write(hs.write_message(handshake_payload(self._identity, hs.s_pub)))
            return []
        peer_id, identity = verify_payload(payload, cast(bytes, hs.rs))
        if self.expected_peer is not None and peer_id != self.expected_peer:
            raise RemoteProtocolError(f"libp2p noise: dialled {self.expected_peer}, the peer proved {peer_id}")
        if hs.initiator:
            self._write(hs.write_message(handshake_payload(self._identity, hs.s_pub)))
        self._send, self._receive = hs.split()
        self._state = _State.TRANSPORT
        self.remote = Authenticated(peer_id, identity)
        return [self.remote]

    def _write(self, message: bytes) -> None:
        self._out.append(len(message).to_bytes(2, "big"))
        self._out.append(message)

    @property
    def handshake_hash(self) -> bytes:
        return self._hs.handshake_hash
