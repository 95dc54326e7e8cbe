"""The primitives under villagemesh's Sphinx: X25519, a BLAKE2b KDF, a ChaCha20 stream, LIONESS.

Everything is built from libsodium (through PyNaCl) and hashlib, nothing else:

``x25519(scalar, point)``
    libsodium's ``crypto_scalarmult`` (the scalar is clamped). libsodium refuses a
    result of all zeros, which is what a low-order point gives; that refusal is a
    :class:`~villagemesh.errors.RemoteProtocolError` here, since the point always
    comes from the wire.
``kdf(secret, label, size)``
    keyed BLAKE2b: ``blake2b(key=secret, salt=label, person=PERSON, digest_size=size)``
    (the shape of libsodium's ``crypto_kdf``); every per-hop key has its own label.
``stream_xor(key, nonce, data)``
    ChaCha20-IETF keystream XOR ``data``, taken from the body of
    ``crypto_aead_chacha20poly1305_ietf_encrypt`` (its tag dropped). That is
    ChaCha20 with the block counter starting at **1**, not 0: PyNaCl offers no raw
    stream cipher, and the XOR is done in C.
``lioness_encrypt / lioness_decrypt(key, block)``
    LIONESS (Anderson and Biham), a wide-block cipher: any change to the block
    changes all of it, so a payload cannot be tagged along a path. Four rounds,
    ``R ^= S(L ^ k1); L ^= H(k2, R); R ^= S(L ^ k3); L ^= H(k4, R)``, with S the stream
    above keyed by a 32-byte value and H keyed BLAKE2b-256; the key is 128 bytes.
"""

from __future__ import annotations

import hashlib

import nacl.bindings
import nacl.exceptions
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "KEY_BYTES",
    "LIONESS_KEY_BYTES",
    "NONCE_BYTES",
    "PERSON",
    "kdf",
    "lioness_decrypt",
    "lioness_encrypt",
    "stream_xor",
    "x25519",
    "x25519_base",
    "xor",
]

KEY_BYTES = 32
"""X25519 scalars and points, ChaCha20 keys, BLAKE2b keys, MACs: all 32 bytes."""

NONCE_BYTES = 12
"""ChaCha20-IETF nonce."""

LIONESS_KEY_BYTES = 4 * KEY_BYTES
"""k1, k2, k3, k4 of 32 bytes each."""

PERSON = b"villagemesh-sph1"
"""BLAKE2b personalisation of every key derived here (16 bytes): keys of this format and no other."""

_ZERO_NONCE = bytes(NONCE_BYTES)


def x25519_base(scalar: bytes) -> bytes:
    """``scalar · G``: the public point of a 32-byte secret."""
    return bytes(nacl.bindings.crypto_scalarmult_base(scalar))


def x25519(scalar: bytes, point: bytes) -> bytes:
    """``scalar · point``; a low-order ``point`` (all-zero result) is a :class:`RemoteProtocolError`."""
    try:
        return bytes(nacl.bindings.crypto_scalarmult(scalar, point))
    except nacl.exceptions.RuntimeError as exc:
        raise RemoteProtocolError(f"sphinx: group element {point.hex()} is of low order") from exc


def kdf(secret: bytes, label: bytes, size: int) -> bytes:
    """``size`` bytes (at most 64) of key material for ``label`` (at most 16 bytes) from ``secret``."""
    return hashlib.blake2b(key=secret, salt=label, person=PERSON, digest_size=size).digest()


def stream_xor(key: bytes, nonce: bytes, data: bytes) -> bytes:
    """``data`` XOR ChaCha20-IETF(key, nonce) from block counter 1.

    Calls libsodium through PyNaCl's own cffi binding: ``nacl.bindings``' wrapper
    checks its arguments in Python, which cost as much as the cipher at these
    sizes, and every caller here passes a 32-byte key and a 12-byte nonce it
    made itself. ``tests/protocols/test_sphinx.py`` holds it to RFC 8439 and to
    the wrapper's output.
    """
    size = len(data)
    out = _ffi.new("unsigned char[]", size + 16)
    _lib.crypto_aead_chacha20poly1305_ietf_encrypt(out, _ffi.NULL, data, size, _ffi.NULL, 0, _ffi.NULL, nonce, key)
    return _ffi.buffer(out, size)[:]


def xor(a: bytes, b: bytes) -> bytes:
    """``a`` XOR ``b`` (of one length)."""
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _split(key: bytes, block: bytes) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes]:
    if len(key) != LIONESS_KEY_BYTES:
        raise LocalProtocolError(f"lioness: the key must be {LIONESS_KEY_BYTES} bytes, got {len(key)}")
    if len(block) <= KEY_BYTES:
        raise LocalProtocolError(f"lioness: a block must be longer than {KEY_BYTES} bytes, got {len(block)}")
    k1, k2, k3, k4 = (key[i : i + KEY_BYTES] for i in range(0, LIONESS_KEY_BYTES, KEY_BYTES))
    return k1, k2, k3, k4, block[:KEY_BYTES], block[KEY_BYTES:]


def _h(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, key=key, digest_size=KEY_BYTES).digest()


def lioness_encrypt(key: bytes, block: bytes) -> bytes:
    """LIONESS-encrypt ``block`` (longer than 32 bytes) under a 128-byte ``key``."""
    k1, k2, k3, k4, left, right = _split(key, block)
    right = stream_xor(xor(left, k1), _ZERO_NONCE, right)
    left = xor(left, _h(k2, right))
    right = stream_xor(xor(left, k3), _ZERO_NONCE, right)
    left = xor(left, _h(k4, right))
    return left + right


def lioness_decrypt(key: bytes, block: bytes) -> bytes:
    """The inverse of :func:`lioness_encrypt`."""
    k1, k2, k3, k4, left, right = _split(key, block)
    left = xor(left, _h(k4, right))
    right = stream_xor(xor(left, k3), _ZERO_NONCE, right)
    left = xor(left, _h(k2, right))
    right = stream_xor(xor(left, k1), _ZERO_NONCE, right)
    return left + right
