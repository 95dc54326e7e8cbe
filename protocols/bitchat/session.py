"""BitChat's Noise sessions: ``Noise_XX_25519_ChaChaPoly_SHA256`` with BitChat's framing; sans-I/O.

The handshake is standard Noise XX (the raw :class:`villagemesh.protocols.noise.XXHandshake`)
with an empty prologue and empty payloads, as ``NoiseSession.swift`` runs it;
its three messages (32, 96 and 64 bytes) travel as the payloads of packets of
type 0x10, and the peer's identity is its Noise static key (its peer id is
:func:`.packet.peer_id` of it). Transport messages (type 0x11 payloads) are not
standard Noise: BitChat sends the counter with each message, because a mesh
loses and reorders packets::

    nonce u32 big-endian | ChaCha20-Poly1305(key, 4 zero bytes + nonce as u64 little-endian, ad="", plaintext) + tag(16)

and the receiver keeps a sliding replay window of ``REPLAY_WINDOW`` (1024)
counters: a counter at or below ``highest - 1024``, or one already accepted, is
refused. A counter is marked only after its message authenticated, so a forged
packet cannot burn a counter.

Rules (``_TRANSITIONS`` is all of them)::

    INITIATOR_START --START--> AWAIT_MESSAGE_2 --MESSAGE--> TRANSPORT
    AWAIT_MESSAGE_1 --MESSAGE--> AWAIT_MESSAGE_3 --MESSAGE--> TRANSPORT
    TRANSPORT --ENCRYPT/DECRYPT--> TRANSPORT

1. A pair not in the table is a violation: the session moves to ``FAILED``
   (terminal) and raises :class:`LocalProtocolError` for our inputs (START,
   ENCRYPT) and :class:`RemoteProtocolError` for the peer's.
2. Any handshake error (wrong size, bad tag, bad key) is terminal.
3. In ``TRANSPORT`` a bad tag, a short message or a replay is refused with a
   :class:`RemoteProtocolError` but the session goes on: a forged or replayed
   packet on a broadcast medium must not end a session. Exhausting our 4-byte
   send counter is terminal (a new handshake is needed).
"""

from __future__ import annotations

import enum
import struct

from nacl.bindings import crypto_aead_chacha20poly1305_ietf_decrypt, crypto_aead_chacha20poly1305_ietf_encrypt
from nacl.exceptions import CryptoError

from villagemesh.errors import ConfigError, LocalProtocolError, ProtocolError, RemoteProtocolError

from ..noise import DH_BYTES, TAG_BYTES, XXHandshake
from .packet import peer_id

__all__ = [
    "HANDSHAKE_SIZES",
    "NONCE_BYTES",
    "NONCE_LIMIT",
    "REPLAY_WINDOW",
    "BitchatSession",
    "ReplayWindow",
    "SessionInput",
    "SessionState",
    "transition",
]

NONCE_BYTES = 4
"""The explicit counter in front of each transport message."""
NONCE_LIMIT = 2**32
"""A 4-byte counter: 2**32 messages per direction, then a new handshake."""
REPLAY_WINDOW = 1024
"""Counters remembered behind the highest seen (BitChat's sliding window)."""
HANDSHAKE_SIZES = (DH_BYTES, DH_BYTES + (DH_BYTES + TAG_BYTES) + TAG_BYTES, (DH_BYTES + TAG_BYTES) + TAG_BYTES)
"""XX with empty payloads: 32, 96 and 64 bytes."""

_NONCE = struct.Struct(">I")
_NONCE_PAD = bytes(4)


class SessionState(enum.Enum):
    """Where a session is."""

    INITIATOR_START = enum.auto()
    AWAIT_MESSAGE_1 = enum.auto()
    AWAIT_MESSAGE_2 = enum.auto()
    AWAIT_MESSAGE_3 = enum.auto()
    TRANSPORT = enum.auto()
    FAILED = enum.auto()


class SessionInput(enum.Enum):
    """What can happen to a session."""

    START = enum.auto()
    MESSAGE = enum.auto()
    ENCRYPT = enum.auto()
    DECRYPT = enum.auto()


_S, _I = SessionState, SessionInput
_TRANSITIONS = {
    (_S.INITIATOR_START, _I.START): _S.AWAIT_MESSAGE_2,
    (_S.AWAIT_MESSAGE_2, _I.MESSAGE): _S.TRANSPORT,
    (_S.AWAIT_MESSAGE_1, _I.MESSAGE): _S.AWAIT_MESSAGE_3,
    (_S.AWAIT_MESSAGE_3, _I.MESSAGE): _S.TRANSPORT,
    (_S.TRANSPORT, _I.ENCRYPT): _S.TRANSPORT,
    (_S.TRANSPORT, _I.DECRYPT): _S.TRANSPORT,
}
_LOCAL_INPUTS = frozenset({_I.START, _I.ENCRYPT})


def transition(state: SessionState, event: SessionInput) -> SessionState:
    """The next state.

    Raises:
        LocalProtocolError, RemoteProtocolError: the pair is not allowed.
    """
    try:
        return _TRANSITIONS[state, event]
    except KeyError as exc:
        error = LocalProtocolError if event in _LOCAL_INPUTS else RemoteProtocolError
        raise error(f"BitChat session cannot take {event.name} in state {state.name}") from exc


class ReplayWindow:
    """Which counters were accepted, within ``size`` behind the highest."""

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        self.size = size
        self.highest = -1
        self._bits = 0  # bit i set: counter highest - i was accepted

    def check(self, n: int) -> None:
        """Raise if ``n`` is too old or already accepted.

        Raises:
            RemoteProtocolError: ``n`` is outside the window or a replay.
        """
        if n > self.highest:
            return
        if n + self.size <= self.highest:
            raise RemoteProtocolError(f"counter {n} is older than the replay window (highest {self.highest})")
        if self._bits >> (self.highest - n) & 1:
            raise RemoteProtocolError(f"counter {n} was already received (a replay)")

    def mark(self, n: int) -> None:
        """Record ``n`` as accepted (after :meth:`check` passed and the message authenticated)."""
        if n > self.highest:
            self._bits = ((self._bits << (n - self.highest)) | 1) & ((1 << self.size) - 1)
            self.highest = n
        else:
            self._bits |= 1 << (self.highest - n)


class BitchatSession:
    """One end of a BitChat Noise session. Build it with :meth:`initiator` or :meth:`responder`.

    Use: the initiator sends :meth:`start`'s bytes in a 0x10 packet; each side
    feeds the peer's handshake payloads to :meth:`receive_handshake` and sends
    what it returns (if anything); once :attr:`established`, :meth:`encrypt`
    and :meth:`decrypt` make and read 0x11 payloads.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        static: bytes,
        ephemeral: bytes | None = None,
        nonce_limit: int = NONCE_LIMIT,
        window: int = REPLAY_WINDOW,
    ) -> None:
        for name, key in (("static", static), ("ephemeral", ephemeral)):
            if key is not None and (not isinstance(key, bytes) or len(key) != DH_BYTES):
                raise ConfigError(f"{name} must be {DH_BYTES} bytes, got {key!r}")
        if not (isinstance(nonce_limit, int) and 1 <= nonce_limit <= NONCE_LIMIT):
            raise ConfigError(f"nonce_limit must be within 1..2**32, got {nonce_limit!r}")
        self._handshake = XXHandshake(initiator, static, b"", ephemeral)
        self._state = SessionState.INITIATOR_START if initiator else SessionState.AWAIT_MESSAGE_1
        self._nonce_limit = nonce_limit
        self._window = ReplayWindow(window)
        self._send_key: bytes | None = None
        self._recv_key: bytes | None = None
        self._sent = 0
        self.remote_static: bytes | None = None
        """The peer's Noise static public key, once it was authenticated."""

    @classmethod
    def initiator(cls, static: bytes, ephemeral: bytes | None = None) -> BitchatSession:
        """The side that starts (by BitChat's rule, the lower peer id when both try)."""
        return cls(initiator=True, static=static, ephemeral=ephemeral)

    @classmethod
    def responder(cls, static: bytes, ephemeral: bytes | None = None) -> BitchatSession:
        """The side that answers a first handshake message."""
        return cls(initiator=False, static=static, ephemeral=ephemeral)

    @property
    def state(self) -> SessionState:
        """Where the session is."""
        return self._state

    @property
    def established(self) -> bool:
        """True once the handshake completed."""
        return self._state is SessionState.TRANSPORT

    @property
    def remote_peer_id(self) -> bytes | None:
        """The peer's BitChat peer id, once its static key is known."""
        return None if self.remote_static is None else peer_id(self.remote_static)

    @property
    def handshake_hash(self) -> bytes:
        """The Noise handshake hash (a name for this session)."""
        return self._handshake.handshake_hash

    def _step(self, event: SessionInput) -> None:
        try:
            self._state = transition(self._state, event)
        except ProtocolError:
            self._state = SessionState.FAILED
            raise

    def start(self) -> bytes:
        """The initiator's first handshake message (32 bytes).

        Raises:
            LocalProtocolError: this is not an initiator that has not started.
        """
        self._step(SessionInput.START)
        return self._handshake.write_message(b"")

    def receive_handshake(self, message: bytes) -> bytes | None:
        """Read the peer's next handshake message; our reply to send, or None.

        Raises:
            RemoteProtocolError: out of turn, the wrong size, or it fails
                authentication; the session is then FAILED.
        """
        state = self._state
        self._step(SessionInput.MESSAGE)
        try:
            expected = HANDSHAKE_SIZES[self._handshake.index]
            if len(message) != expected:
                raise RemoteProtocolError(
                    f"handshake message in {state.name} must be {expected} bytes, got {len(message)}"
                )
            self._handshake.read_message(message)
            reply = None if self._handshake.complete else self._handshake.write_message(b"")
        except ProtocolError:
            self._state = SessionState.FAILED
            raise
        if self._handshake.complete:
            self.remote_static = self._handshake.rs
            send, receive = self._handshake.split()
            self._send_key, self._recv_key = send.key, receive.key
        return reply

    def encrypt(self, plaintext: bytes) -> bytes:
        """A 0x11 payload: our counter and the sealed plaintext.

        Raises:
            LocalProtocolError: not established, or the counter is exhausted (terminal).
        """
        self._step(SessionInput.ENCRYPT)
        n = self._sent
        if n >= self._nonce_limit:
            self._state = SessionState.FAILED
            raise LocalProtocolError(f"send counter exhausted at {n} messages; a new handshake is needed")
        assert self._send_key is not None  # set on entering TRANSPORT
        sealed = crypto_aead_chacha20poly1305_ietf_encrypt(
            plaintext, b"", _NONCE_PAD + n.to_bytes(8, "little"), self._send_key
        )
        self._sent = n + 1
        return _NONCE.pack(n) + sealed

    def decrypt(self, payload: bytes) -> bytes:
        """The plaintext of a 0x11 payload.

        Raises:
            RemoteProtocolError: not established (terminal), or short,
                replayed, too old or failing authentication (the session goes on).
        """
        self._step(SessionInput.DECRYPT)
        if len(payload) < NONCE_BYTES + TAG_BYTES:
            raise RemoteProtocolError(f"encrypted payload of {len(payload)} bytes is shorter than nonce and tag")
        (n,) = _NONCE.unpack_from(payload)
        self._window.check(n)
        assert self._recv_key is not None  # set on entering TRANSPORT
        try:
            plaintext = crypto_aead_chacha20poly1305_ietf_decrypt(
                payload[NONCE_BYTES:], b"", _NONCE_PAD + n.to_bytes(8, "little"), self._recv_key
            )
        except CryptoError as exc:
            raise RemoteProtocolError(f"encrypted payload with counter {n} failed authentication") from exc
        self._window.mark(n)
        return plaintext
