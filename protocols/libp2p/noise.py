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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import nacl.exceptions
import nacl.signing

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

from ..noise import TAG_BYTES, BulkAeadFactory, BytesLike, CipherState, XXHandshake
from .peerid import ED25519_KEY_PROTO_PREFIX, PeerId
from .protobuf import encode_bytes_field, parse_fields

__all__ = ["MAX_PLAINTEXT", "PROTOCOL_ID", "SIGNATURE_PREFIX", "Authenticated", "Data", "NoiseSession"]

PROTOCOL_ID = "/noise"
SIGNATURE_PREFIX = b"noise-libp2p-static-key:"
MAX_MESSAGE = 65535
MAX_PLAINTEXT = MAX_MESSAGE - TAG_BYTES
_MSG2_MIN = 32 + 48 + TAG_BYTES
PLAIN_MIN = 16 * 1024
"""The smallest decryption buffer of :meth:`NoiseSession.receive_borrowed`: a connection that carries only
pings and envelopes keeps 16 KiB, one that carries bulk grows it once to a read's size (~320 KiB)."""


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The handshake is done: the peer proved ``peer_id`` (its Ed25519 ``identity`` key)."""

    peer_id: PeerId
    identity: bytes


@dataclass(frozen=True, slots=True)
class Data:
    """A transport message's plaintext: a buffer of its own from :meth:`NoiseSession.receive_data`, a
    view of the session's reused buffer from :meth:`NoiseSession.receive_borrowed`."""

    data: bytes | bytearray | memoryview


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


def _pack(frames: Sequence[BytesLike]) -> Sequence[BytesLike]:
    """The plaintexts of the messages carrying ``frames``: neighbours joined while they fit one message,
    a frame above :data:`MAX_PLAINTEXT` cut (its last piece may share a message with what follows)."""
    if len(frames) == 1 and len(frames[0]) <= MAX_PLAINTEXT:
        return frames  # one message as it is (a ping, an envelope, a window update)
    out: list[BytesLike] = []
    group: list[BytesLike] = []
    size = 0
    for frame in frames:
        if len(frame) > MAX_PLAINTEXT:
            view = memoryview(frame)
            cut = len(view) - (len(view) % MAX_PLAINTEXT or MAX_PLAINTEXT)
            frame = view[cut:]
            if group:
                out.append(_joined(group))
                group, size = [], 0
            out += [view[at : at + MAX_PLAINTEXT] for at in range(0, cut, MAX_PLAINTEXT)]
        elif group and size + len(frame) > MAX_PLAINTEXT:
            out.append(_joined(group))
            group, size = [], 0
        group.append(frame)
        size += len(frame)
    if group:
        out.append(_joined(group))
    return out


def _joined(group: list[BytesLike]) -> BytesLike:
    return group[0] if len(group) == 1 else b"".join(group)


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
        bulk: BulkAeadFactory | None = None,
    ) -> None:
        self._hs = XXHandshake(initiator, static, b"", ephemeral)
        self._bulk = bulk
        """The transport frames' cipher (:class:`~villagemesh.protocols.noise.BulkAead`), or None: libsodium's."""
        self._identity = identity
        self.expected_peer = expected_peer
        self._state = _State.HANDSHAKE
        self._in = bytearray()
        self._out: list[bytes | bytearray] = []
        """Framed messages to send, joined once by :meth:`data_to_send` (not grown byte by byte)."""
        self._send: CipherState | None = None
        self._receive: CipherState | None = None
        self._plain: bytearray | None = None
        """Where :meth:`receive_borrowed` decrypts to (one buffer, reused while it is large enough)."""
        self._at = 0
        self.remote: Authenticated | None = None
        if initiator:
            self._write(self._hs.write_message(b""))

    @classmethod
    def initiator(
        cls,
        static: bytes,
        identity: nacl.signing.SigningKey,
        *,
        expected_peer: PeerId | None = None,
        bulk: BulkAeadFactory | None = None,
    ) -> NoiseSession:
        return cls(initiator=True, static=static, identity=identity, expected_peer=expected_peer, bulk=bulk)

    @classmethod
    def responder(
        cls, static: bytes, identity: nacl.signing.SigningKey, *, bulk: BulkAeadFactory | None = None
    ) -> NoiseSession:
        return cls(initiator=False, static=static, identity=identity, bulk=bulk)

    def data_to_send(self) -> bytes | bytearray:
        """Every framed message since the last call, in one buffer (the one a bulk write made, not copied)."""
        if len(self._out) == 1:
            return self._out.pop()
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send(self, data: BytesLike) -> None:
        """Encrypt ``data`` for the peer (split into frames of at most :data:`MAX_PLAINTEXT`)."""
        self.send_frames((data,))

    def send_frames(self, frames: Sequence[BytesLike]) -> None:
        """Encrypt ``frames`` (a muxer's, in order) into as few Noise messages as their boundaries allow.

        Consecutive frames share a message while they fit :data:`MAX_PLAINTEXT` together; a
        frame larger than that is split. A muxer whose frames each fit one message (yamux
        frames of at most :data:`MAX_PLAINTEXT` bytes) so never has one cut in two, and its
        peer reads each where it lies, without putting it back together. Every message is
        encrypted straight into one output buffer, from the frame where it lies.
        """
        if self._state is not _State.TRANSPORT or self._send is None:
            raise LocalProtocolError(f"libp2p noise: cannot send while {self._state.value}")
        plaintexts = _pack(frames)
        if not plaintexts:
            return
        out = bytearray(sum(len(p) for p in plaintexts) + len(plaintexts) * (2 + TAG_BYTES))
        at, cipher = 0, self._send
        for plaintext in plaintexts:
            size = len(plaintext) + TAG_BYTES
            out[at : at + 2] = size.to_bytes(2, "big")
            cipher.encrypt_into(b"", plaintext, out, at + 2)
            at += 2 + size
        self._out.append(out)

    def receive_data(self, data: BytesLike) -> list[Authenticated | Data]:
        """Feed bytes from the peer. Only an incomplete frame at the end is kept (copied), so the caller
        may reuse ``data``'s buffer at once; whole frames are decrypted where they lie, each into a
        buffer of its own."""
        return self._receive_data(data, None)

    def receive_borrowed(self, data: BytesLike) -> list[Authenticated | Data]:
        """:meth:`receive_data`, but every :class:`Data` is a view of one buffer the session reuses:
        valid only until the next call, so the caller consumes or copies it at once.

        The receive path of a host: no buffer allocated (and zeroed) per message, and the
        plaintext lands where the next message's will, warm in the cache.
        """
        need = len(self._in) + len(data)  # every plaintext is shorter than its framed ciphertext
        plain = self._plain
        if plain is None or len(plain) < need:
            plain = self._plain = bytearray(max(need, PLAIN_MIN))  # a new one: old views stay intact
        self._at = 0
        return self._receive_data(data, plain)

    def _receive_data(self, data: BytesLike, plain: bytearray | None) -> list[Authenticated | Data]:
        if self._state is _State.FAILED:
            raise LocalProtocolError("libp2p noise: this session has failed")
        events: list[Authenticated | Data] = []
        view = memoryview(data)
        try:
            if self._in:  # finish the frame begun before, taking only its own bytes
                pending = self._in
                if len(pending) < 2:
                    pending += view[:1]
                    view = view[1:]
                need = 2 + int.from_bytes(pending[:2], "big") - len(pending) if len(pending) >= 2 else 0
                if len(pending) < 2 or len(view) < need:
                    pending += view
                    return events
                pending += view[:need]
                view = view[need:]
                self._in = bytearray()
                self._on_frame(memoryview(pending)[2:], events, plain)
            at, end = 0, len(view)
            while end - at >= 2:
                size = view[at] << 8 | view[at + 1]
                if end - at - 2 < size:
                    break
                self._on_frame(view[at + 2 : at + 2 + size], events, plain)
                at += 2 + size
            if at < end:
                self._in = bytearray(view[at:])
        except (RemoteProtocolError, LocalProtocolError):
            self._state = _State.FAILED
            raise
        return events

    def _on_frame(self, frame: memoryview, events: list[Authenticated | Data], plain: bytearray | None) -> None:
        if self._state is _State.TRANSPORT:
            cipher = cast(CipherState, self._receive)
            if plain is None:
                events.append(Data(cipher.decrypt_view(b"", frame)))
            else:
                at = self._at
                self._at = end = at + cipher.decrypt_into(b"", frame, plain, at)
                events.append(Data(memoryview(plain)[at:end]))
        elif self._handshake(bytes(frame)):
            events.append(cast(Authenticated, self.remote))

    def _handshake(self, frame: bytes) -> bool:
        """One handshake message; whether it completed the handshake."""
        hs = self._hs
        if not hs.initiator and hs.index == 0 and len(frame) != 32:
            raise RemoteProtocolError(f"libp2p noise: message 1 is 32 bytes, got {len(frame)}")
        if hs.initiator and len(frame) < _MSG2_MIN:
            raise RemoteProtocolError(f"libp2p noise: message 2 is at least {_MSG2_MIN} bytes, got {len(frame)}")
        payload = hs.read_message(frame)
        if hs.index == 1:  # the responder read message 1: answer with message 2
            self._write(hs.write_message(handshake_payload(self._identity, hs.s_pub)))
            return False
        peer_id, identity = verify_payload(payload, cast(bytes, hs.rs))
        if self.expected_peer is not None and peer_id != self.expected_peer:
            raise RemoteProtocolError(f"libp2p noise: dialled {self.expected_peer}, the peer proved {peer_id}")
        if hs.initiator:
            self._write(hs.write_message(handshake_payload(self._identity, hs.s_pub)))
        self._send, self._receive = hs.split()
        self._send.use(self._bulk)
        self._receive.use(self._bulk)
        self._state = _State.TRANSPORT
        self.remote = Authenticated(peer_id, identity)
        return True

    def _write(self, message: bytes) -> None:
        self._out.append(len(message).to_bytes(2, "big"))
        self._out.append(message)

    @property
    def handshake_hash(self) -> bytes:
        return self._hs.handshake_hash
