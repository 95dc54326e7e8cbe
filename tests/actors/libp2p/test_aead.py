"""OpenSSL's ChaCha20-Poly1305 (through ``cryptography``) seals and opens exactly what libsodium's does."""

from __future__ import annotations

import os
import sys

import pytest
from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt

from villagemesh.actors.libp2p.aead import BULK_AEAD, openssl_aead
from villagemesh.protocols.noise import TAG_BYTES, CipherState


@pytest.mark.parametrize("size", [0, 44, 65519])
def test_openssl_seals_and_opens_the_bytes_libsodium_does(size: int) -> None:
    assert BULK_AEAD is not None, "the test extra installs cryptography"
    key, nonce, plaintext = os.urandom(32), os.urandom(12), os.urandom(size)
    cipher = BULK_AEAD(key)
    sealed = bytearray(size + TAG_BYTES)
    cipher.seal_into(nonce, plaintext, b"ad", memoryview(sealed))
    assert sealed == crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, b"ad", nonce, key)
    opened = bytearray(size)
    assert cipher.open_into(nonce, sealed, b"ad", memoryview(opened)) and opened == plaintext
    sealed[-1] ^= 1
    assert not cipher.open_into(nonce, sealed, b"ad", memoryview(opened))


def test_a_cipher_state_using_openssl_interoperates_with_one_using_libsodium() -> None:
    assert BULK_AEAD is not None
    key = os.urandom(32)
    fast, plain = CipherState(key), CipherState(key)
    fast.use(BULK_AEAD)
    out = bytearray(5 + TAG_BYTES)
    fast.encrypt_into(b"", b"hello", out, 0)
    back = bytearray(5)
    assert plain.decrypt_into(b"", out, back, 0) == 5 and back == b"hello"


def test_without_cryptography_libsodium_serves_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)
    assert openssl_aead() is None


def test_a_cryptography_without_its_metadata_is_passed_over_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importable but with no distribution metadata (a source checkout on PYTHONPATH): libsodium serves."""
    import importlib.metadata

    def absent(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.delitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", raising=False)
    monkeypatch.setattr(importlib.metadata, "version", absent)
    assert openssl_aead() is None


def test_openssl_is_loaded_by_the_first_bulk_frame_not_by_the_import() -> None:
    """A node that never carries a bulk frame never loads OpenSSL's bindings (5.5 MiB a process)."""
    import subprocess

    probe = (
        "import sys, villagemesh.actors.libp2p.aead as a; assert a.BULK_AEAD is not None;"
        "c = a.BULK_AEAD(bytes(32)); print('cryptography' in sys.modules);"
        "c.seal_into(bytes(12), b'x', b'', memoryview(bytearray(17))); print('cryptography' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


def test_a_cryptography_without_the_into_calls_is_passed_over_for_libsodium() -> None:
    """cryptography 42-46 have no encrypt_into/decrypt_into: libsodium serves, nothing fails later."""
    from villagemesh.actors.libp2p.aead import _has_into

    assert [_has_into(v) for v in ("42.0.8", "46.0.7", "47.0.0", "51.0.1", "dev")] == [False, False, True, True, False]
