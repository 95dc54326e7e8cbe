"""OpenSSL's ChaCha20-Poly1305 for libp2p's Noise transport frames, when ``cryptography`` is installed.

The same cipher as libsodium's (RFC 8439, the same bytes: ``tests/actors/libp2p/test_aead.py``), faster
on this machine's bulk frames: 20 µs for 64 KiB against libsodium's 46 µs (OpenSSL has AVX-512
ChaCha20 and Poly1305, the libsodium in PyNaCl's wheel AVX2 ChaCha20 and SSE2 Poly1305). Messages
under :data:`~villagemesh.protocols.noise.BULK_MIN` stay with libsodium: OpenSSL sets a context up per
message, and a ping through both stacks took ~100 µs with it against ~70 µs without, in one process.
``protocols/`` imports only nacl, so the host hands it in (:class:`~villagemesh.protocols.noise.BulkAead`);
without ``cryptography`` (the extra ``fast``) libsodium serves alone.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from typing import Any

from villagemesh.protocols.noise import BulkAead, BulkAeadFactory, BytesLike

__all__ = ["BULK_AEAD", "openssl_aead"]


def openssl_aead() -> BulkAeadFactory | None:
    """A factory of OpenSSL's cipher by key, or None when ``cryptography`` is not installed.

    Nothing is imported here: OpenSSL's bindings (5.5 MiB of resident memory in each node
    process, measured) are loaded by the first bulk frame a cipher seals or opens, so a node that
    never carries one (pings, envelopes under :data:`~villagemesh.protocols.noise.BULK_MIN`) never
    pays for them.
    """
    if "cryptography.hazmat.primitives.ciphers.aead" in sys.modules:  # imported (or hidden: None) already
        return OpenSslAead if sys.modules["cryptography.hazmat.primitives.ciphers.aead"] is not None else None
    try:
        found = importlib.util.find_spec("cryptography") is not None  # the top level: nothing is imported
    except ValueError:  # hidden (sys.modules["cryptography"] = None)
        found = False
    if not found:
        return None
    try:
        version = importlib.metadata.version("cryptography")
    except importlib.metadata.PackageNotFoundError:  # importable without its metadata (a checkout on sys.path)
        return None  # its version is unknowable without importing it: libsodium serves (libp2p_listening says so)
    return OpenSslAead if _has_into(version) else None


OPENSSL_MIN_MAJOR = 47
"""``ChaCha20Poly1305.encrypt_into``/``decrypt_into`` first came in cryptography 47.0 (checked:
42-46 lack them): an older install is passed over for libsodium, not failed on at the first frame."""


def _has_into(version: str) -> bool:
    """Whether cryptography ``version`` (its metadata, read without importing it) has the ``_into`` calls."""
    major = version.split(".", 1)[0]
    return major.isdigit() and int(major) >= OPENSSL_MIN_MAJOR


class OpenSslAead(BulkAead):
    """OpenSSL's ChaCha20-Poly1305 for one key, made on its first use."""

    __slots__ = ("_cipher", "_invalid", "_key")

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._cipher: Any = None
        self._invalid: type[Exception] = Exception  # cryptography's InvalidTag, once made

    def _made(self) -> Any:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        self._cipher, self._invalid = ChaCha20Poly1305(self._key), InvalidTag
        return self._cipher

    def seal_into(self, nonce: bytes, plaintext: BytesLike, ad: bytes, out: memoryview) -> None:
        (self._cipher or self._made()).encrypt_into(nonce, plaintext, ad, out)

    def open_into(self, nonce: bytes, ciphertext: BytesLike, ad: bytes, out: memoryview) -> bool:
        cipher = self._cipher or self._made()
        try:
            cipher.decrypt_into(nonce, ciphertext, ad, out)
        except self._invalid:  # InvalidTag: the frame is not authentic
            return False
        return True


BULK_AEAD = openssl_aead()
"""What the host's Noise sessions encrypt their transport frames with (None: libsodium's)."""
