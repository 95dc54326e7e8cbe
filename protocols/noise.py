"""The secure channel: ``Noise_XX_25519_ChaChaPoly_SHA256`` with Ed25519 identities, sans-I/O.

Two nodes that each hold an Ed25519 *identity* key (the key their node id is
derived from, see :mod:`villagemesh.protocols.discovery`) and an X25519
*static* key run the Noise XX handshake (Noise spec rev. 34, §7.5). Each side's
handshake payload binds its static key to its identity, so after the handshake
each side knows the other's identity, and everything after is encrypted and
authenticated.

Wire, as the initiator sees it::

    initiator                                         responder
    "VMSC" 01                                   ->    (magic header, 5 bytes, plaintext)
    len16 | e                                   ->    message 1: 32 bytes
    len16 | e, ee, s, es, ENC(identity payload) <-    message 2: 192 bytes
    len16 | s, se, ENC(identity payload)        ->    message 3: 160 bytes
    len16 | ENC(data) ...                       <->   transport frames, each <= 65535 bytes

- **Magic header.** A bare Noise first message is a 2-byte length and 32
  random-looking bytes, which no sniffer can recognise. So the initiator first
  sends ``SECURE_MAGIC`` + a version byte (``HEADER``, :mod:`.sniff` knows it);
  the responder refuses another magic or version by name. The header is also the
  Noise *prologue*, so both sides have provably seen the same header.
- **Framing.** Every Noise message travels as a 2-byte big-endian length and the
  message; Noise caps a message at 65535 bytes, so a transport frame carries at
  most ``MAX_PLAINTEXT`` = 65519 bytes of data plus the 16-byte tag, and
  :meth:`SecureChannel.send` splits larger data. Handshake messages have exact
  sizes, checked on the length prefix before their bodies are buffered.
- **Identity binding.** The handshake payload (messages 2 and 3) is
  ``identity public key (32) || Ed25519 signature (64)`` over
  ``IDENTITY_DOMAIN + the sender's X25519 static public key``; the receiver
  verifies it against the static key the handshake just authenticated
  (libp2p's noise handshake does the same). A wrong signature, or an identity
  other than the ``expected_identity`` a dialer asked for, is a
  :class:`RemoteProtocolError`.
- **Nonces, rekey, hard stop.** Each direction has its own ChaCha20-Poly1305
  key and 64-bit message counter (nonce = 4 zero bytes + little-endian counter).
  Every ``REKEY_INTERVAL`` messages in a direction both ends apply Noise's
  ``REKEY`` (§11.3: the first 32 bytes of ENCRYPT(k, 2**64-1, "", 32 zeros)), so
  a key lifted from memory opens at most that many messages. Rekeying does not
  reset the counter (the spec says so), so nonce exhaustion still needs a limit:
  at ``NONCE_LIMIT`` (2**64-1, the nonce Noise reserves) the channel stops for
  good: sending raises :class:`LocalProtocolError`, receiving
  :class:`RemoteProtocolError`, and the peers must open a new channel. Both
  numbers are constructor arguments so tests reach them in a few messages; both
  ends must use the same ``rekey_interval`` (it is part of the protocol).

State machine rules (the whole of them are in ``_TRANSITIONS`` below, as in
h2's ``connection.py``; the header comment of h11's ``_state.py`` is the model):

1. ``(state, input) -> next state`` is one dict. A pair that is not in it is a
   protocol violation: the channel moves to ``FAILED`` (terminal) and raises,
   :class:`LocalProtocolError` when *we* asked for the impossible (``SEND``
   before the handshake completed) and :class:`RemoteProtocolError` when the
   *peer's* bytes did.
2. Inputs from the peer are decided by the state: in ``AWAIT_HEADER`` the next
   5 bytes are the header, in ``AWAIT_MESSAGE_n`` the next frame is handshake
   message n, in ``TRANSPORT`` a frame is data.
3. Any error (a bad tag, a bad signature, a size mismatch) is terminal too: a
   channel whose counters or framing may be out of step is never reused.

    INITIATOR_START --START--> AWAIT_MESSAGE_2 --MESSAGE--> TRANSPORT --SEND/FRAME--> TRANSPORT
    AWAIT_HEADER --HEADER--> AWAIT_MESSAGE_1 --MESSAGE--> AWAIT_MESSAGE_3 --MESSAGE--> TRANSPORT

The raw Noise layer (:class:`CipherState`, :class:`SymmetricState`,
:class:`XXHandshake`) is public so that tests can check it against the
published cacophony vector and the independent ``noiseprotocol`` package.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypedDict, Unpack

from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError
from nacl.signing import SigningKey, VerifyKey

from villagemesh.errors import ConfigError, LocalProtocolError, ProtocolError, RemoteProtocolError

from .framing import NEED_DATA, LengthPrefixedReader, NeedData
from .sniff import SECURE_MAGIC

__all__ = [
    "BULK_MIN",
    "DH_BYTES",
    "HEADER",
    "IDENTITY_DOMAIN",
    "MAX_FRAME",
    "MAX_PLAINTEXT",
    "NEED_DATA",
    "NONCE_LIMIT",
    "PROTOCOL_NAME",
    "REKEY_INTERVAL",
    "VERSION",
    "BulkAead",
    "BulkAeadFactory",
    "ChannelInput",
    "ChannelOptions",
    "ChannelState",
    "CipherState",
    "Data",
    "HandshakeComplete",
    "SecureChannel",
    "SymmetricState",
    "XXHandshake",
    "identity_payload",
    "seal",
    "seal_into",
    "transition",
    "unseal",
    "unseal_into",
    "unseal_view",
]

BytesLike = bytes | bytearray | memoryview
"""What the zero-copy calls read from: any contiguous bytes, a view included."""

PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_SHA256"
"""The Noise protocol name; exactly 32 bytes, so it is the initial hash as it stands."""

VERSION = 1
"""The secure channel's version byte, sent after the magic."""

HEADER = SECURE_MAGIC + bytes([VERSION])
"""What the initiator sends first (and both sides use as the Noise prologue)."""

DH_BYTES = 32
"""X25519 keys are 32 bytes."""

TAG_BYTES = 16
"""A ChaCha20-Poly1305 tag."""

MAX_FRAME = 65535
"""Noise's maximum message size, and what a 2-byte length can say."""

MAX_PLAINTEXT = MAX_FRAME - TAG_BYTES
"""65519 bytes of data per transport frame."""

IDENTITY_DOMAIN = b"villagemesh-noise-static-key:"
"""Prefixed to the static key an identity signs, so the signature means nothing elsewhere."""

REKEY_INTERVAL = 2**16
"""Messages per direction between rekeys: a stolen key opens at most 65536 messages (4 GiB at full frames)."""

NONCE_LIMIT = 2**64 - 1
"""Nonce 2**64-1 is reserved by Noise (REKEY uses it): a direction may send 2**64-1 messages, then stops."""

_IDENTITY_BYTES = 32 + 64
_MESSAGE_SIZES = (DH_BYTES, DH_BYTES + (DH_BYTES + TAG_BYTES) + (_IDENTITY_BYTES + TAG_BYTES))
_MESSAGE_3_SIZE = (DH_BYTES + TAG_BYTES) + (_IDENTITY_BYTES + TAG_BYTES)
_LEN2 = struct.Struct(">H")
_NONCE_PAD = bytes(4)
_NONCE = struct.Struct("<4xQ")
"""A transport nonce: four zero bytes, then the counter little-endian (Noise §5.1)."""
_ZEROS32 = bytes(32)

# ---------------------------------------------------------------------------- Noise primitives (spec §4, §5)


def _hkdf2(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """Noise's HKDF with two outputs, on HMAC-SHA256."""
    temp = hmac.new(chaining_key, ikm, hashlib.sha256).digest()
    out1 = hmac.new(temp, b"\x01", hashlib.sha256).digest()
    out2 = hmac.new(temp, out1 + b"\x02", hashlib.sha256).digest()
    return out1, out2


def _dh(private: bytes, public: bytes) -> bytes:
    try:
        return crypto_scalarmult(private, public)
    except CryptoError as exc:  # libsodium refuses low-order points (an all-zero shared secret)
        raise RemoteProtocolError(f"peer sent an invalid X25519 public key {public.hex()}") from exc


def seal(plaintext: bytes, ad: bytes, nonce: bytes, key: bytes) -> bytes:
    """ChaCha20-Poly1305 (IETF) of ``plaintext``: ciphertext and tag.

    Calls libsodium through PyNaCl's own cffi binding (as :mod:`villagemesh.protocols.sphinx.crypto`
    does): ``nacl.bindings``' wrapper checks its arguments in Python, ~9 µs a call, more than
    the cipher on a small frame; every caller here passes a 32-byte key and a 12-byte nonce it
    made itself. ``tests/protocols/test_noise.py`` holds it to the wrapper's output.
    """
    size = len(plaintext) + TAG_BYTES
    out = _ffi.new("unsigned char[]", size)
    _lib.crypto_aead_chacha20poly1305_ietf_encrypt(
        out, _ffi.NULL, plaintext, len(plaintext), ad, len(ad), _ffi.NULL, nonce, key
    )
    return _ffi.buffer(out, size)[:]


def unseal(ciphertext: bytes, ad: bytes, nonce: bytes, key: bytes) -> bytes | None:
    """The plaintext of ``ciphertext`` (at least a tag long), or None when its tag does not verify."""
    size = len(ciphertext) - TAG_BYTES
    out = _ffi.new("unsigned char[]", max(size, 1))
    failed = _lib.crypto_aead_chacha20poly1305_ietf_decrypt(
        out, _ffi.NULL, _ffi.NULL, ciphertext, len(ciphertext), ad, len(ad), nonce, key
    )
    return None if failed else _ffi.buffer(out, size)[:]


def seal_into(out: bytearray, at: int, plaintext: BytesLike, ad: bytes, nonce: bytes, key: bytes) -> None:
    """:func:`seal`, written into ``out[at : at + len(plaintext) + TAG_BYTES]``.

    No buffer of its own and no copy: the bulk path (libp2p's Noise frames) encrypts every
    frame of a write straight into the one buffer that goes to the socket, reading the
    plaintext where it lies (a view of the muxer's frame).
    """
    _lib.crypto_aead_chacha20poly1305_ietf_encrypt(
        _ffi.from_buffer(_UCHARS, out) + at,
        _ffi.NULL,
        _ffi.from_buffer(_UCHARS, plaintext),
        len(plaintext),
        ad,
        len(ad),
        _ffi.NULL,
        nonce,
        key,
    )


def unseal_view(ciphertext: BytesLike, ad: bytes, nonce: bytes, key: bytes) -> bytearray | None:
    """:func:`unseal` of a view (a frame where it lies in the receive buffer), into a buffer of its own."""
    size = len(ciphertext) - TAG_BYTES
    out = bytearray(size or 1)  # libsodium writes nothing for an empty plaintext, but wants a pointer
    if not unseal_into(ciphertext, ad, nonce, key, out, 0):
        return None
    return out if size else bytearray()


def unseal_into(ciphertext: BytesLike, ad: bytes, nonce: bytes, key: bytes, out: bytearray, at: int) -> bool:
    """:func:`unseal` written into ``out[at : at + len(ciphertext) - TAG_BYTES]``; whether the tag verified.

    No buffer of its own: the receive path (libp2p's Noise frames) decrypts every frame of a read
    into one buffer it reuses, from the ciphertext where it lies. ``out`` must not overlap it.
    """
    failed = _lib.crypto_aead_chacha20poly1305_ietf_decrypt(
        _ffi.from_buffer(_UCHARS, out) + at,
        _ffi.NULL,
        _ffi.NULL,
        _ffi.from_buffer(_UCHARS, ciphertext),
        len(ciphertext),
        ad,
        len(ad),
        nonce,
        key,
    )
    return not failed


_UCHARS = "unsigned char[]"


class BulkAead(Protocol):
    """Another implementation of the same ChaCha20-Poly1305 (RFC 8439, the same bytes), keyed once, for the
    bulk calls of a :class:`CipherState` (:meth:`~CipherState.encrypt_into`, :meth:`~CipherState.decrypt_into`).

    ``protocols/`` imports only nacl; an actor may hand in a faster one (the libp2p host hands in
    OpenSSL's through ``cryptography`` when it is installed: ``actors/libp2p/aead.py``).
    """

    def seal_into(self, nonce: bytes, plaintext: BytesLike, ad: bytes, out: memoryview) -> None:
        """Ciphertext and tag of ``plaintext`` into ``out`` (exactly ``len(plaintext) + TAG_BYTES`` bytes)."""

    def open_into(self, nonce: bytes, ciphertext: BytesLike, ad: bytes, out: memoryview) -> bool:
        """The plaintext of ``ciphertext`` into ``out`` (exactly ``len(ciphertext) - TAG_BYTES`` bytes);
        whether the tag verified."""


BulkAeadFactory = Callable[[bytes], BulkAead]
"""Makes a :class:`BulkAead` for a 32-byte key."""

BULK_MIN = 4096
"""Plaintexts from this size on go to a :class:`BulkAead` handed in; smaller ones stay with libsodium's
one-shot call, which costs less per call on a ping's few bytes (OpenSSL's sets a context up per message)."""


class CipherState:
    """A key and a message counter (Noise §5.1); transport frames use one per direction.

    Args:
        key: the 32-byte key, or None before the handshake mixed one in.
        nonce_limit: the counter value at which the state refuses to go on.
    """

    __slots__ = ("_bulk", "_key", "_make_bulk", "n", "nonce_limit")

    def __init__(self, key: bytes | None = None, nonce_limit: int = NONCE_LIMIT) -> None:
        self._make_bulk: BulkAeadFactory | None = None
        self.key = key
        self.n = 0
        self.nonce_limit = nonce_limit

    @property
    def key(self) -> bytes | None:
        return self._key

    @key.setter
    def key(self, key: bytes | None) -> None:
        self._key = key
        make = self._make_bulk
        self._bulk = make(key) if make is not None and key is not None else None
        """The bulk calls' cipher keyed with ``key`` (:meth:`use`), or None: libsodium's then."""

    def use(self, bulk: BulkAeadFactory | None) -> None:
        """Encrypt and decrypt the bulk calls with ``bulk``'s cipher from now on (None: libsodium's)."""
        self._make_bulk = bulk
        self.key = self._key

    def encrypt(self, ad: bytes, plaintext: bytes) -> bytes:
        """ENCRYPT(k, n++, ad, plaintext), or the plaintext while there is no key.

        Raises:
            LocalProtocolError: the counter reached ``nonce_limit``.
        """
        if self.key is None:
            return plaintext
        n = self.n
        if n >= self.nonce_limit:
            raise LocalProtocolError(f"send nonce exhausted at {n} messages; open a new channel")
        out = seal(plaintext, ad, _NONCE_PAD + n.to_bytes(8, "little"), self.key)
        self.n = n + 1
        return out

    def decrypt(self, ad: bytes, ciphertext: bytes) -> bytes:
        """DECRYPT(k, n++, ad, ciphertext), or the ciphertext while there is no key.

        Raises:
            RemoteProtocolError: a bad tag, or the counter reached ``nonce_limit``.
        """
        if self.key is None:
            return ciphertext
        return bytes(self.decrypt_view(ad, ciphertext))

    def encrypt_into(self, ad: bytes, plaintext: BytesLike, out: bytearray, at: int) -> None:
        """:meth:`encrypt` written into ``out`` at ``at`` (``len(plaintext) + TAG_BYTES`` bytes; a key is needed).

        Raises:
            LocalProtocolError: the counter reached ``nonce_limit``.
        """
        n = self.n
        if n >= self.nonce_limit:
            raise LocalProtocolError(f"send nonce exhausted at {n} messages; open a new channel")
        assert self.key is not None, "encrypt_into before a key exists"
        if self._bulk is not None and len(plaintext) >= BULK_MIN:
            self._bulk.seal_into(_NONCE.pack(n), plaintext, ad, memoryview(out)[at : at + len(plaintext) + TAG_BYTES])
        else:
            seal_into(out, at, plaintext, ad, _NONCE.pack(n), self.key)
        self.n = n + 1

    def decrypt_view(self, ad: bytes, ciphertext: BytesLike) -> bytearray:
        """:meth:`decrypt` of a view, into a buffer of its own (a key is needed).

        Raises:
            RemoteProtocolError: a bad tag, or the counter reached ``nonce_limit``.
        """
        n = self.n
        if n >= self.nonce_limit:
            raise RemoteProtocolError(f"peer sent past the nonce limit ({n} messages)")
        if len(ciphertext) < TAG_BYTES:
            raise RemoteProtocolError(f"frame {n} of {len(ciphertext)} bytes is shorter than its {TAG_BYTES}-byte tag")
        assert self.key is not None, "decrypt_view before a key exists"  # decrypt() passes on none without one
        out = unseal_view(ciphertext, ad, _NONCE.pack(n), self.key)
        if out is None:
            raise RemoteProtocolError(f"frame {n} failed authentication ({len(ciphertext)} bytes)")
        self.n = n + 1
        return out

    def decrypt_into(self, ad: bytes, ciphertext: BytesLike, out: bytearray, at: int) -> int:
        """:meth:`decrypt_view` written into ``out`` at ``at`` (a key is needed); the plaintext's length.

        Raises:
            RemoteProtocolError: a bad tag, or the counter reached ``nonce_limit``.
        """
        n = self.n
        if n >= self.nonce_limit:
            raise RemoteProtocolError(f"peer sent past the nonce limit ({n} messages)")
        size = len(ciphertext) - TAG_BYTES
        if size < 0:
            raise RemoteProtocolError(f"frame {n} of {len(ciphertext)} bytes is shorter than its {TAG_BYTES}-byte tag")
        assert self.key is not None, "decrypt_into before a key exists"
        if self._bulk is not None and size >= BULK_MIN:
            verified = self._bulk.open_into(_NONCE.pack(n), ciphertext, ad, memoryview(out)[at : at + size])
        else:
            verified = unseal_into(ciphertext, ad, _NONCE.pack(n), self.key, out, at)
        if not verified:
            raise RemoteProtocolError(f"frame {n} failed authentication ({len(ciphertext)} bytes)")
        self.n = n + 1
        return size

    def rekey(self) -> None:
        """REKEY (Noise §11.3): k = first 32 bytes of ENCRYPT(k, 2**64-1, "", 32 zeros); n is kept."""
        assert self.key is not None, "rekey before a key exists"
        reserved = _NONCE_PAD + (2**64 - 1).to_bytes(8, "little")
        self.key = crypto_aead_chacha20poly1305_ietf_encrypt(_ZEROS32, b"", reserved, self.key)[:32]


class SymmetricState:
    """The handshake hash ``h``, chaining key ``ck`` and a :class:`CipherState` (Noise §5.2)."""

    def __init__(self) -> None:
        self.h = PROTOCOL_NAME  # exactly HASHLEN (32) bytes, so used as it stands (§5.2 InitializeSymmetric)
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        """Mix a DH result into the chaining key and start a new handshake key."""
        self.ck, key = _hkdf2(self.ck, ikm)
        self.cipher = CipherState(key)

    def mix_hash(self, data: bytes) -> None:
        """h = SHA-256(h || data)."""
        self.h = hashlib.sha256(self.h + data).digest()

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """Encrypt with h as associated data, then hash the ciphertext."""
        ciphertext = self.cipher.encrypt(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """Decrypt with h as associated data, then hash the ciphertext."""
        plaintext = self.cipher.decrypt(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self, nonce_limit: int = NONCE_LIMIT) -> tuple[CipherState, CipherState]:
        """The two transport cipher states: (initiator -> responder, responder -> initiator)."""
        k1, k2 = _hkdf2(self.ck, b"")
        return CipherState(k1, nonce_limit), CipherState(k2, nonce_limit)


_XX = (("e",), ("e", "ee", "s", "es"), ("s", "se"))
"""The XX pattern (Noise §7.5): -> e; <- e, ee, s, es; -> s, se."""


class XXHandshake:
    """One side of a raw Noise XX handshake, without villagemesh's header, framing or identity layer.

    Args:
        initiator: which side this is.
        static: our X25519 private key (32 bytes).
        prologue: bytes both sides must agree on (villagemesh uses ``HEADER``).
        ephemeral: a fixed X25519 ephemeral private key (tests only); random by default.
    """

    def __init__(self, initiator: bool, static: bytes, prologue: bytes = b"", ephemeral: bytes | None = None) -> None:
        self.initiator = initiator
        self.symmetric = SymmetricState()
        self.symmetric.mix_hash(prologue)
        self.s = static
        self.s_pub = crypto_scalarmult_base(static)
        self.e = ephemeral if ephemeral is not None else os.urandom(DH_BYTES)
        self.e_pub = crypto_scalarmult_base(self.e)
        self.re: bytes | None = None
        self.rs: bytes | None = None
        self.index = 0

    @property
    def complete(self) -> bool:
        """True once all three messages have been written or read."""
        return self.index == len(_XX)

    @property
    def handshake_hash(self) -> bytes:
        """The final h: a unique name for this session (channel binding)."""
        return self.symmetric.h

    def _our_turn(self) -> bool:
        return (self.index % 2 == 0) == self.initiator

    def write_message(self, payload: bytes) -> bytes:
        """The next handshake message, carrying ``payload``.

        Raises:
            LocalProtocolError: it is not our turn to write.
        """
        if self.complete or not self._our_turn():
            raise LocalProtocolError(f"not our turn to write handshake message {self.index + 1}")
        out = []
        for token in _XX[self.index]:
            if token == "e":
                out.append(self.e_pub)
                self.symmetric.mix_hash(self.e_pub)
            elif token == "s":
                out.append(self.symmetric.encrypt_and_hash(self.s_pub))
            else:
                self._mix_dh(token)
        out.append(self.symmetric.encrypt_and_hash(payload))
        self.index += 1
        return b"".join(out)

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's next handshake message; returns its payload.

        Raises:
            LocalProtocolError: it is not the peer's turn.
            RemoteProtocolError: the message is truncated, fails authentication
                or carries an invalid key.
        """
        if self.complete or self._our_turn():
            raise LocalProtocolError(f"not the peer's turn to write handshake message {self.index + 1}")
        pos = 0
        for token in _XX[self.index]:
            if token in ("e", "s"):
                size = DH_BYTES + (TAG_BYTES if token == "s" else 0)
                if len(message) < pos + size:
                    raise RemoteProtocolError(f"handshake message {self.index + 1} truncated at {token!r}")
                chunk = message[pos : pos + size]
                pos += size
                if token == "e":
                    self.re = chunk
                    self.symmetric.mix_hash(chunk)
                else:
                    self.rs = self.symmetric.decrypt_and_hash(chunk)
            else:
                self._mix_dh(token)
        payload = self.symmetric.decrypt_and_hash(message[pos:])
        self.index += 1
        return payload

    def _mix_dh(self, token: str) -> None:
        # ee: e with re; es: the initiator's e with the responder's s; se: the reverse.
        ours = self.e if token == "ee" or (token == "es") == self.initiator else self.s
        theirs = self.re if token == "ee" or (token == "se") == self.initiator else self.rs
        assert theirs is not None, f"token {token} before the peer's key was read"
        self.symmetric.mix_key(_dh(ours, theirs))

    def split(self, nonce_limit: int = NONCE_LIMIT) -> tuple[CipherState, CipherState]:
        """(our send state, our receive state) once complete."""
        assert self.complete, "split before the handshake completed"
        c1, c2 = self.symmetric.split(nonce_limit)
        return (c1, c2) if self.initiator else (c2, c1)


# ---------------------------------------------------------------------------- the state machine


class ChannelState(enum.Enum):
    """Where a :class:`SecureChannel` is."""

    INITIATOR_START = "initiator_start"
    AWAIT_HEADER = "await_header"
    AWAIT_MESSAGE_1 = "await_message_1"
    AWAIT_MESSAGE_2 = "await_message_2"
    AWAIT_MESSAGE_3 = "await_message_3"
    TRANSPORT = "transport"
    FAILED = "failed"


class ChannelInput(enum.Enum):
    """What can happen to a :class:`SecureChannel`; ``START`` and ``SEND`` are ours, the rest the peer's."""

    START = "start"
    HEADER = "header"
    MESSAGE = "message"
    FRAME = "frame"
    SEND = "send"


_LOCAL_INPUTS = frozenset({ChannelInput.START, ChannelInput.SEND})

_TRANSITIONS: dict[tuple[ChannelState, ChannelInput], ChannelState] = {
    (ChannelState.INITIATOR_START, ChannelInput.START): ChannelState.AWAIT_MESSAGE_2,
    (ChannelState.AWAIT_HEADER, ChannelInput.HEADER): ChannelState.AWAIT_MESSAGE_1,
    (ChannelState.AWAIT_MESSAGE_1, ChannelInput.MESSAGE): ChannelState.AWAIT_MESSAGE_3,
    (ChannelState.AWAIT_MESSAGE_2, ChannelInput.MESSAGE): ChannelState.TRANSPORT,
    (ChannelState.AWAIT_MESSAGE_3, ChannelInput.MESSAGE): ChannelState.TRANSPORT,
    (ChannelState.TRANSPORT, ChannelInput.FRAME): ChannelState.TRANSPORT,
    (ChannelState.TRANSPORT, ChannelInput.SEND): ChannelState.TRANSPORT,
}


def transition(state: ChannelState, event: ChannelInput) -> ChannelState:
    """The next state, or a ProtocolError for a pair the table does not allow.

    Raises:
        LocalProtocolError: ``event`` is ours (START, SEND) and not allowed now.
        RemoteProtocolError: ``event`` came from the peer and is not allowed now.
    """
    try:
        return _TRANSITIONS[state, event]
    except KeyError as exc:
        error = LocalProtocolError if event in _LOCAL_INPUTS else RemoteProtocolError
        raise error(f"secure channel cannot take {event.name} in state {state.name}") from exc


# ---------------------------------------------------------------------------- the channel


@dataclass(frozen=True)
class HandshakeComplete:
    """The handshake finished; the peer proved it holds ``remote_identity`` (an Ed25519 public key)."""

    remote_identity: bytes
    remote_static: bytes


@dataclass(frozen=True)
class Data:
    """Application bytes from one transport frame."""

    data: bytes


def identity_payload(identity: SigningKey, static_public: bytes) -> bytes:
    """The handshake payload binding ``static_public`` to ``identity``: public key || signature."""
    signature = identity.sign(IDENTITY_DOMAIN + static_public).signature
    return bytes(identity.verify_key) + signature


def _verify_identity(payload: bytes, remote_static: bytes, expected: bytes | None) -> bytes:
    identity, signature = payload[:32], payload[32:]
    try:
        VerifyKey(identity).verify(IDENTITY_DOMAIN + remote_static, signature)
    except (CryptoError, ValueError) as exc:
        raise RemoteProtocolError(f"peer identity {identity.hex()} did not sign its static key") from exc
    if expected is not None and identity != expected:
        raise RemoteProtocolError(f"peer identity {identity.hex()} is not the expected {expected.hex()}")
    return identity


class ChannelOptions(TypedDict, total=False):
    """Optional keyword arguments of :meth:`SecureChannel.initiator` and :meth:`SecureChannel.responder`."""

    expected_identity: bytes | None
    """Refuse any peer whose identity is not this Ed25519 public key."""
    ephemeral: bytes | None
    """A fixed X25519 ephemeral private key, for tests only (random by default)."""
    rekey_interval: int | None
    """Messages per direction between rekeys (default ``REKEY_INTERVAL``; None: never). Both ends must agree."""
    nonce_limit: int
    """Messages per direction before the hard stop (default ``NONCE_LIMIT``; lower it only in tests)."""


class SecureChannel:
    """One end of a villagemesh secure channel; sans-I/O. Build it with :meth:`initiator` or :meth:`responder`.

    Use: write :meth:`data_to_send` to the peer whenever it is non-empty; feed
    everything received to :meth:`receive_data` and call :meth:`next_event`
    until :data:`NEED_DATA`. After :class:`HandshakeComplete`, :meth:`send`
    turns application bytes into frames and :class:`Data` events carry the
    peer's bytes.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        static: bytes,
        identity: SigningKey,
        expected_identity: bytes | None = None,
        ephemeral: bytes | None = None,
        rekey_interval: int | None = REKEY_INTERVAL,
        nonce_limit: int = NONCE_LIMIT,
    ) -> None:
        for name, key in (("static", static), ("ephemeral", ephemeral), ("expected_identity", expected_identity)):
            if key is not None and (not isinstance(key, bytes) or len(key) != DH_BYTES):
                raise ConfigError(f"{name} must be {DH_BYTES} bytes, got {key!r}")
        if not isinstance(identity, SigningKey):
            raise ConfigError(f"identity must be a nacl.signing.SigningKey, got {identity!r}")
        if rekey_interval is not None and not (isinstance(rekey_interval, int) and rekey_interval >= 1):
            raise ConfigError(f"rekey_interval must be None or an int >= 1, got {rekey_interval!r}")
        if not (isinstance(nonce_limit, int) and 1 <= nonce_limit <= NONCE_LIMIT):
            raise ConfigError(f"nonce_limit must be within 1..2**64-1, got {nonce_limit!r}")
        self._handshake = XXHandshake(initiator, static, HEADER, ephemeral)
        self._identity_payload = identity_payload(identity, self._handshake.s_pub)
        self._expected_identity = expected_identity
        self._rekey_interval = rekey_interval
        self._nonce_limit = nonce_limit
        self._reader = LengthPrefixedReader(_LEN2, _MESSAGE_SIZES[1 if initiator else 0], "secure channel")
        self._outgoing = bytearray()
        self._send_cs: CipherState | None = None
        self._recv_cs: CipherState | None = None
        self._error: ProtocolError | None = None
        self.remote_identity: bytes | None = None
        """The peer's Ed25519 public key, once the handshake completed."""
        if initiator:
            self._state = ChannelState.INITIATOR_START
            self._state = transition(self._state, ChannelInput.START)
            self._outgoing += HEADER + self._frame(self._handshake.write_message(b""))
        else:
            self._state = ChannelState.AWAIT_HEADER

    @classmethod
    def initiator(cls, static: bytes, identity: SigningKey, **options: Unpack[ChannelOptions]) -> SecureChannel:
        """The dialing side; its :meth:`data_to_send` starts with ``HEADER``.

        Args:
            static: our X25519 private key (32 bytes).
            identity: our Ed25519 identity key.
            options: see :class:`ChannelOptions`.

        Raises:
            ConfigError: a key of the wrong size or type, or a limit out of range.
        """
        return cls(initiator=True, static=static, identity=identity, **options)

    @classmethod
    def responder(cls, static: bytes, identity: SigningKey, **options: Unpack[ChannelOptions]) -> SecureChannel:
        """The accepting side; the acceptor hands it every byte, header included. Arguments as :meth:`initiator`."""
        return cls(initiator=False, static=static, identity=identity, **options)

    @property
    def state(self) -> ChannelState:
        """Where the channel is."""
        return self._state

    @property
    def handshake_hash(self) -> bytes:
        """The Noise handshake hash (unique per session; meaningful once the handshake completed)."""
        return self._handshake.handshake_hash

    def data_to_send(self) -> bytes:
        """Handshake bytes waiting to be written to the peer (and clears them)."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the peer, in any chunking."""
        self._reader.receive_data(data)

    def next_event(self) -> HandshakeComplete | Data | NeedData:
        """The next event, or :data:`NEED_DATA`.

        Raises:
            RemoteProtocolError: the peer broke the protocol (now or earlier);
                the channel is then FAILED for good.
        """
        if self._error is not None:
            raise RemoteProtocolError(f"secure channel already failed: {self._error}")
        try:
            return self._next_event()
        except ProtocolError as exc:
            self._fail(exc)
            raise

    def _next_event(self) -> HandshakeComplete | Data | NeedData:
        while True:
            if self._state is ChannelState.AWAIT_HEADER:
                header = self._reader.take(len(HEADER))
                if header is None:
                    return NEED_DATA
                self._check_header(header)
                self._state = transition(self._state, ChannelInput.HEADER)
            frame = self._reader.next_frame()
            if frame is None:
                return NEED_DATA
            if self._state is ChannelState.TRANSPORT:
                return Data(self._decrypt(frame))
            event = self._handshake_message(frame)
            if event is not None:
                return event

    def _check_header(self, header: bytes) -> None:
        if header[:4] != SECURE_MAGIC:
            raise RemoteProtocolError(f"not a villagemesh secure channel: header {header!r}")
        if header[4] != VERSION:
            raise RemoteProtocolError(f"unsupported secure channel version {header[4]} (only {VERSION})")

    def _handshake_message(self, frame: bytes) -> HandshakeComplete | None:
        state = self._state
        expected = self._reader.max_length
        if len(frame) != expected:
            raise RemoteProtocolError(f"handshake message in {state.name} must be {expected} bytes, got {len(frame)}")
        self._state = transition(state, ChannelInput.MESSAGE)  # raises in FAILED
        payload = self._handshake.read_message(frame)
        if state is ChannelState.AWAIT_MESSAGE_1:
            self._outgoing += self._frame(self._handshake.write_message(self._identity_payload))
            self._reader.max_length = _MESSAGE_3_SIZE
            return None
        assert self._handshake.rs is not None  # read in message 2 or 3
        self.remote_identity = _verify_identity(payload, self._handshake.rs, self._expected_identity)
        if state is ChannelState.AWAIT_MESSAGE_2:
            self._outgoing += self._frame(self._handshake.write_message(self._identity_payload))
        self._send_cs, self._recv_cs = self._handshake.split(self._nonce_limit)
        self._reader.max_length = MAX_FRAME
        return HandshakeComplete(remote_identity=self.remote_identity, remote_static=self._handshake.rs)

    def _decrypt(self, frame: bytes) -> bytes:
        self._state = transition(self._state, ChannelInput.FRAME)
        cs = self._recv_cs
        assert cs is not None  # set on entering TRANSPORT
        plaintext = cs.decrypt(b"", frame)
        if self._rekey_interval is not None and cs.n % self._rekey_interval == 0:
            cs.rekey()
        return plaintext

    def send(self, data: bytes) -> bytes:
        """Encrypt ``data`` into frames of at most ``MAX_FRAME`` bytes (one AEAD call each); b"" sends nothing.

        Raises:
            LocalProtocolError: the handshake has not completed, the channel
                failed, or the send nonce is exhausted (the channel is then FAILED).
        """
        if not isinstance(data, bytes):
            data = bytes(data)  # the AEAD binding takes bytes only
        try:
            self._state = transition(self._state, ChannelInput.SEND)
            cs = self._send_cs
            assert cs is not None  # set on entering TRANSPORT
            interval = self._rekey_interval
            pack = _LEN2.pack
            out: list[bytes] = []
            for start in range(0, len(data), MAX_PLAINTEXT):
                ciphertext = cs.encrypt(b"", data[start : start + MAX_PLAINTEXT])
                out.append(pack(len(ciphertext)))
                out.append(ciphertext)
                if interval is not None and cs.n % interval == 0:
                    cs.rekey()
            return b"".join(out)
        except ProtocolError as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: ProtocolError) -> None:
        self._error = exc
        self._state = ChannelState.FAILED

    @staticmethod
    def _frame(message: bytes) -> bytes:
        return _LEN2.pack(len(message)) + message
