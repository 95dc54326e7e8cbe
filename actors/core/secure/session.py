"""An authenticated session: envelopes over the Noise secure channel, sender checked against the peer's key.

:class:`~villagemesh.protocols.noise.SecureChannel` proves *who* the peer is (its
Ed25519 identity signed its Noise static key); this layer turns that proof into
the rule the node relies on: **an envelope's ``sender`` is a claim, the session's
peer id is a fact, and an envelope whose claim differs from the fact is never
delivered.** Like the channel it is sans-I/O (bytes in, events out, bytes to
write); it lives outside ``protocols/`` only because it logs and counts.

Layers, for one envelope::

    send_envelope(raw) ──▶ len32 | raw ──▶ SecureChannel.send ──▶ len16 | ENC(…) frames ──▶ socket
    socket ──▶ SecureChannel ──▶ Data(bytes) ──▶ LengthPrefixedReader(len32) ──▶ decode_message
                                                          │                            │
                                                 oversized: fatal          bad envelope / sender ≠ peer:
                                                                           Rejected (counted, logged)

- **Framing inside the channel.** Each envelope is prefixed with its 4-byte
  big-endian length (the layout of :func:`~villagemesh.protocols.envelope.frame_message`),
  so an envelope larger than one Noise frame (65519 bytes) spans several, and
  several small ones may share a frame. A length above ``MAX_MESSAGE_BYTES`` is
  fatal as soon as its four bytes arrive (the framing cannot be trusted past it).
- **What is fatal, what is not.** Anything the *channel* refuses (a bad tag, a
  bad handshake, a wrong identity, an oversized length) raises
  :class:`RemoteProtocolError` and the session is dead for good: every later
  call raises again. A well-framed envelope that does not decode, or whose
  ``sender`` is not the peer's node id, is a :class:`Rejected` event: counted in
  :attr:`Session.counts`, logged as ``envelope_rejected``, never delivered, and
  the session stays up (the peer is authenticated; its bad envelope is its bug).
  Events decoded earlier in the same :meth:`Session.receive_data` call as a
  fatal error are discarded with it (the peer broke the channel; the retrier's
  acknowledgements make an honest sender resend).
- **Expected peer.** A dialler knows which node id it dials (``expected_peer``);
  a different authenticated node id is fatal: ``RemoteProtocolError("expected X, got Y")``.
- **Sending.** Only after :class:`Authenticated`; the envelope must decode and
  its sender must be *our* node id (the peer would reject anything else, so a
  mistake fails here, naming the value, as :class:`LocalProtocolError`).
  :meth:`Session.send_envelopes` sends several at once, sharing Noise frames.
  :meth:`Session.send_envelope` returns pending handshake bytes first, so
  writing what it returns always keeps the stream in order.

Log events (structlog, fixed keys): ``session_authenticated`` (peer_id, role),
``envelope_rejected`` (peer_id, kind, reason) where kind is ``sender`` or ``envelope``.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any

import structlog
from nacl.signing import SigningKey

from villagemesh.actors.core.envelopes import decode
from villagemesh.errors import ConfigError, LocalProtocolError, ProtocolError, RemoteProtocolError
from villagemesh.protocols.discovery import node_id_from_public_key
from villagemesh.protocols.envelope import MAX_MESSAGE_BYTES, Message
from villagemesh.protocols.framing import LengthPrefixedReader
from villagemesh.protocols.noise import NEED_DATA, Data, HandshakeComplete, SecureChannel

__all__ = [
    "Authenticated",
    "EnvelopeReceived",
    "Rejected",
    "Session",
    "SessionEvent",
]

_LEN4 = struct.Struct(">I")
_NODE_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The handshake completed: the peer holds the Ed25519 key ``identity``, so its node id is ``peer_id``."""

    peer_id: str
    identity: bytes


@dataclass(frozen=True, slots=True)
class EnvelopeReceived:
    """An envelope from the authenticated peer, its sender checked; ``raw`` is its encoding as received."""

    message: Message
    raw: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """A well-framed envelope was refused (undecodable, or its sender is not the peer); the session goes on."""

    reason: str


SessionEvent = Authenticated | EnvelopeReceived | Rejected
"""What :meth:`Session.receive_data` returns, in stream order."""


def _check_node_id(name: str, value: object) -> None:
    if not (isinstance(value, str) and _NODE_ID.fullmatch(value)):
        raise ConfigError(f"{name} must be a node id (32 lowercase hex characters), got {value!r}")


class Session:
    """One end of an authenticated envelope session; sans-I/O. Build it with :meth:`initiator` or :meth:`responder`.

    Use: write :meth:`data_to_send` to the peer whenever it is non-empty (after
    construction and after every :meth:`receive_data`); feed every received
    byte to :meth:`receive_data` and act on the events it returns; once
    :attr:`authenticated`, write what :meth:`send_envelope` returns.

    Args:
        static_key: our X25519 static private key (32 bytes).
        signing_key: our Ed25519 identity key.
        initiator: which side of the channel this is (prefer :meth:`initiator` / :meth:`responder`).
        expected_peer: the node id the peer must authenticate as, or None for any.
        log: a structlog-shaped logger (default ``villagemesh.secure``).

    Raises:
        ConfigError: a key of the wrong size or type, or ``expected_peer`` not a node id.
    """

    def __init__(
        self,
        static_key: bytes,
        signing_key: SigningKey,
        *,
        initiator: bool,
        expected_peer: str | None = None,
        log: Any = None,
    ) -> None:
        if expected_peer is not None:
            _check_node_id("expected_peer", expected_peer)
        make = SecureChannel.initiator if initiator else SecureChannel.responder
        self._channel = make(static_key, signing_key)
        self.role = "initiator" if initiator else "responder"
        """``"initiator"`` or ``"responder"``."""
        self.node_id = node_id_from_public_key(bytes(signing_key.verify_key))
        """Our own node id (what our envelopes' ``sender`` must be)."""
        self.expected_peer = expected_peer
        self.log = log if log is not None else structlog.get_logger("villagemesh.secure")
        self.peer_id: str | None = None
        """The peer's node id, once authenticated."""
        self.peer_identity: bytes | None = None
        """The peer's Ed25519 public key, once authenticated."""
        self.counts: Counter[str] = Counter()
        """``received``, ``sent``, ``rejected.sender``, ``rejected.envelope``."""
        self._envelopes = LengthPrefixedReader(_LEN4, MAX_MESSAGE_BYTES, "secure session envelope")
        self._error: ProtocolError | None = None

    @classmethod
    def initiator(
        cls, static_key: bytes, signing_key: SigningKey, *, expected_peer: str | None, log: Any = None
    ) -> Session:
        """The dialling side (its first :meth:`data_to_send` opens the channel).

        Args:
            static_key: our X25519 static private key (32 bytes).
            signing_key: our Ed25519 identity key.
            expected_peer: the node id we dial (None: whoever answers, e.g. a first contact).
            log: a structlog-shaped logger.

        Raises:
            ConfigError: a key of the wrong size or type, or ``expected_peer`` not a node id.
        """
        return cls(static_key, signing_key, initiator=True, expected_peer=expected_peer, log=log)

    @classmethod
    def responder(
        cls, static_key: bytes, signing_key: SigningKey, *, expected_peer: str | None = None, log: Any = None
    ) -> Session:
        """The accepting side: feed it every byte of the connection, the channel's magic header included.

        Arguments as :meth:`initiator`; a responder usually accepts any peer.
        """
        return cls(static_key, signing_key, initiator=False, expected_peer=expected_peer, log=log)

    @property
    def authenticated(self) -> bool:
        """True once the handshake completed and the peer's node id is known (and as expected)."""
        return self.peer_id is not None and self._error is None

    @property
    def failed(self) -> bool:
        """True once a fatal error happened; the session is then unusable."""
        return self._error is not None

    @property
    def handshake_hash(self) -> bytes:
        """The Noise handshake hash: a unique name for this session (meaningful once authenticated)."""
        return self._channel.handshake_hash

    def data_to_send(self) -> bytes:
        """Handshake bytes waiting to be written to the peer (and clears them)."""
        return self._channel.data_to_send()

    def receive_data(self, data: bytes) -> list[SessionEvent]:
        """Feed bytes received from the peer (any chunking); the events they complete, in order.

        Raises:
            RemoteProtocolError: the channel failed (bad handshake, tag, framing),
                the peer is not ``expected_peer``, or an envelope length is
                oversized. Fatal: every later call raises again.
        """
        if self._error is not None:
            raise RemoteProtocolError(f"secure session already failed: {self._error}")
        try:
            return self._receive(data)
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _receive(self, data: bytes) -> list[SessionEvent]:
        self._channel.receive_data(data)
        events: list[SessionEvent] = []
        while (event := self._channel.next_event()) is not NEED_DATA:
            if isinstance(event, HandshakeComplete):
                events.append(self._authenticated(event.remote_identity))
            else:
                assert isinstance(event, Data)
                self._envelopes.receive_data(event.data)
                while (body := self._envelopes.next_frame()) is not None:
                    events.append(self._envelope(body))
        return events

    def _authenticated(self, identity: bytes) -> Authenticated:
        peer_id = node_id_from_public_key(identity)
        if self.expected_peer is not None and peer_id != self.expected_peer:
            raise RemoteProtocolError(f"secure session expected peer {self.expected_peer}, got {peer_id}")
        self.peer_id, self.peer_identity = peer_id, identity
        self.log.info("session_authenticated", peer_id=peer_id, role=self.role)
        return Authenticated(peer_id=peer_id, identity=identity)

    def _envelope(self, raw: bytes) -> EnvelopeReceived | Rejected:
        try:
            message = decode(raw)
        except RemoteProtocolError as exc:
            return self._reject("envelope", f"undecodable envelope of {len(raw)} bytes: {exc}")
        if message.sender != self.peer_id:
            return self._reject(
                "sender", f"envelope {message.id.hex()} claims sender {message.sender!r}, peer is {self.peer_id}"
            )
        self.counts["received"] += 1
        return EnvelopeReceived(message=message, raw=raw)

    def _reject(self, kind: str, reason: str) -> Rejected:
        self.counts[f"rejected.{kind}"] += 1
        self.log.warning("envelope_rejected", peer_id=self.peer_id, kind=kind, reason=reason)
        return Rejected(reason)

    def send_envelopes(self, raws: list[bytes]) -> tuple[bytes, dict[int, str]]:
        """The bytes that send every valid envelope of ``raws`` in one go (pending handshake bytes first).

        The envelopes, each behind its 4-byte length, share Noise frames (one AEAD call per
        up to 65519 bytes, not one per envelope). Returns the bytes and, by index, why each
        envelope that is not ours to send was left out (it is not sent; the others are).

        Raises:
            LocalProtocolError: the session is not authenticated or has failed (nothing is sent).
        """
        if self._error is not None:
            raise LocalProtocolError(f"secure session already failed: {self._error}")
        if self.peer_id is None:
            raise LocalProtocolError("cannot send an envelope before the secure session is authenticated")
        refused: dict[int, str] = {}
        parts: list[bytes] = []
        for index, raw in enumerate(raws):
            try:
                self._check_ours(raw)
            except LocalProtocolError as exc:
                refused[index] = str(exc)
                continue
            parts.append(_LEN4.pack(len(raw)))
            parts.append(raw)
        if not parts:
            return self._channel.data_to_send(), refused
        try:
            frames = self._channel.send(b"".join(parts))
        except ProtocolError as exc:  # nonce exhaustion: the channel is FAILED
            self._error = exc
            raise
        self.counts["sent"] += len(parts) // 2
        return self._channel.data_to_send() + frames, refused

    def _check_ours(self, raw: bytes) -> None:
        """LocalProtocolError unless ``raw`` is a valid envelope whose sender is our node id."""
        try:
            message = decode(raw)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"refusing to send an invalid envelope ({len(raw)} bytes): {exc}") from exc
        if message.sender != self.node_id:
            raise LocalProtocolError(
                f"envelope {message.id.hex()} has sender {message.sender!r}, but this session speaks for {self.node_id}"
            )

    def send_envelope(self, raw: bytes) -> bytes:
        """The bytes to write to send the encoded envelope ``raw`` (pending handshake bytes first).

        Raises:
            LocalProtocolError: the session is not authenticated or has failed,
                ``raw`` is not a valid envelope, or its sender is not our node id.
        """
        if self._error is not None:
            raise LocalProtocolError(f"secure session already failed: {self._error}")
        if self.peer_id is None:
            raise LocalProtocolError("cannot send an envelope before the secure session is authenticated")
        raw = bytes(raw)
        self._check_ours(raw)
        try:
            frames = self._channel.send(_LEN4.pack(len(raw)) + raw)
        except ProtocolError as exc:  # nonce exhaustion: the channel is FAILED
            self._error = exc
            raise
        self.counts["sent"] += 1
        return self._channel.data_to_send() + frames
