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

from villagemesh.protocols.noise import BulkAead, BulkAeadFactory, BytesLike

__all__ = ["BULK_AEAD", "openssl_aead"]


def openssl_aead() -> BulkAeadFactory | None:
    """A factory of OpenSSL's cipher by key, or None when ``cryptography`` is not installed."""
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    except ImportError:
        return None

    class OpenSslAead(BulkAead):
        __slots__ = ("_cipher",)

        def __init__(self, key: bytes) -> None:
            self._cipher = ChaCha20Poly1305(key)

        def seal_into(self, nonce: bytes, plaintext: BytesLike, ad: bytes, out: memoryview) -> None:
            self._cipher.encrypt_into(nonce, plaintext, ad, out)

        def open_into(self, nonce: bytes, ciphertext: BytesLike, ad: bytes, out: memoryview) -> bool:
            try:
                self._cipher.decrypt_into(nonce, ciphertext, ad, out)
            except InvalidTag:
                return False
            return True

    return OpenSslAead


BULK_AEAD = openssl_aead()
"""What the host's Noise sessions encrypt their transport frames with (None: libsodium's)."""
