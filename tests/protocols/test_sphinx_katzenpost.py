"""This project's Sphinx hop, run on Katzenpost's published X25519 Sphinx packets.

What is checked externally, and how: :func:`villagemesh.protocols.sphinx.packet.open_header`
is the hop of this project's Sphinx, written against a :class:`HopGeometry` (where the
header's parts sit and which primitives derive and check them). Katzenpost's packets
(vectors copied from ``core/sphinx/testdata/sphinx_vectors.json``, see the data file)
use the same hop, with other primitives: HKDF-SHA256 (expand only) for the keys,
HMAC-SHA256 over ``AD ‖ α ‖ β`` for γ, AES-256-CTR for β, and an X25519 blinding scalar
drawn from ChaCha20 (block 0, zero nonce) keyed by a seed. With those supplied here
(``cryptography`` for AES-CTR and ChaCha20 block 0, which PyNaCl lacks; a test-only
dependency), our ``open_header`` must, at every hop of every case:

- accept the header (the X25519 shared secret, the key schedule, the MAC over AD ‖ α ‖ β);
- decrypt this hop's routing commands to exactly those the vector says the hop carries
  (the β keystream over ``β ‖ 0^hop``);
- give the next hop's header byte for byte (α blinded, β shifted, the next γ from the
  NextNodeHop command).

What could not be checked: the payloads (Katzenpost encrypts them with AEZ, this
project with LIONESS; no vector exists for a LIONESS payload), this project's own KDF,
MAC and stream (BLAKE2b and libsodium's ChaCha20, checked against RFC 8439 and by
properties in test_sphinx.py), and its routing-block layout (Katzenpost's commands are
another encoding; the block is parsed here by Katzenpost's rules).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from villagemesh.protocols.sphinx.packet import HopGeometry, open_header

VECTORS = json.loads((Path(__file__).parent / "vectors" / "katzenpost_sphinx_vectors.json").read_text())["cases"]
AD = bytes([0, 0])
KDF_INFO = b"katzenpost-kdf-v0-hkdf-sha256"
NRHOPS = 5
NEXT_NODE_HOP, RECIPIENT, SURB_REPLY, NODE_DELAY = 0x01, 0x02, 0x03, 0x80
BODY = {NEXT_NODE_HOP: 64, RECIPIENT: 32, SURB_REPLY: 16, NODE_DELAY: 4}


@dataclass
class KatzenpostKeys:
    mac: bytes
    stream: bytes
    iv: bytes
    blinding: bytes


def hkdf_expand(prk: bytes, info: bytes, size: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < size:
        block = hmac.digest(prk, block + info + bytes([counter]), hashlib.sha256)
        out += block
        counter += 1
    return out[:size]


def derive(shared: bytes, ad: bytes, context: object) -> KatzenpostKeys:
    okm = hkdf_expand(shared, KDF_INFO, 32 + 32 + 16 + 48 + 32)
    seed = okm[128:160]
    chacha = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return KatzenpostKeys(okm[:32], okm[32:64], okm[64:80], chacha.update(bytes(32)))


def keystream(keys: Any, size: int) -> bytes:
    return Cipher(algorithms.AES(keys.stream), modes.CTR(keys.iv)).encryptor().update(bytes(size))


def geometry(routing_info_bytes: int) -> HopGeometry:
    return HopGeometry(
        ad_bytes=2,
        beta_bytes=routing_info_bytes,
        hop_bytes=routing_info_bytes // NRHOPS,
        derive=derive,
        mac=lambda keys, data: hmac.digest(keys.mac, data, hashlib.sha256),  # type: ignore[attr-defined]
        keystream=keystream,
        blinding=lambda keys: keys.blinding,  # type: ignore[attr-defined]
    )


def routing_info_bytes(packet: bytes, secret: bytes) -> int:
    """β's length, found the way only the right one can be: the MAC verifies at that offset."""
    from villagemesh.protocols.sphinx.crypto import x25519

    keys = derive(x25519(secret, packet[2:34]), AD, None)
    for size in range(NRHOPS, len(packet) - 66, NRHOPS):
        expected = hmac.digest(keys.mac, packet[: 34 + size], hashlib.sha256)
        if hmac.compare_digest(expected, packet[34 + size : 66 + size]):
            return size
    raise AssertionError("no routing-info length makes the first hop's MAC verify")


def commands(block: bytes) -> list[bytes]:
    """Katzenpost's routing commands in a hop's block, each as its bytes, up to the null command (then zeros)."""
    out = []
    while block and block[0] != 0:
        size = 1 + BODY[block[0]]
        out.append(block[:size])
        block = block[size:]
    assert block.strip(b"\0") == b"", "non-zero bytes after the terminal null command"
    return out


@pytest.mark.parametrize("case", VECTORS, ids=lambda c: f"{len(c['Path'])}hops{'-surb' if c['Surb'] else ''}")
def test_our_hop_opens_every_header_and_builds_the_next_one_byte_for_byte(case: dict[str, Any]) -> None:
    secrets = [bytes.fromhex(n["PrivateKey"]) for n in case["Nodes"]]
    packets = [bytes.fromhex(p) for p in case["Packets"]]
    size = routing_info_bytes(packets[0], secrets[0])
    g = geometry(size)
    header_bytes = 2 + 32 + size + 32
    for hop, secret in enumerate(secrets):
        opened = open_header(packets[hop][:header_bytes], secret, g)
        found = commands(opened.block)
        following = [c for c in found if c[0] == NEXT_NODE_HOP]
        others = [c.hex() for c in found if c[0] != NEXT_NODE_HOP]
        assert others == case["Path"][hop]["Commands"], f"hop {hop}: routing commands differ"
        if hop < len(secrets) - 1:
            [next_node_hop] = following
            assert next_node_hop[1:33] == bytes.fromhex(case["Path"][hop + 1]["ID"])
            rebuilt = AD + opened.next_alpha() + opened.next_beta + next_node_hop[33:65]
            assert rebuilt == packets[hop + 1][:header_bytes], f"hop {hop}: the next header differs"
        else:
            assert following == [] and any(c[0] == RECIPIENT for c in found)


def test_a_changed_katzenpost_header_is_refused_by_our_hop() -> None:
    """The same check that accepts their packets refuses one with a flipped bit."""
    from villagemesh.errors import RemoteProtocolError

    case = VECTORS[0]
    secret, packet = bytes.fromhex(case["Nodes"][0]["PrivateKey"]), bytes.fromhex(case["Packets"][0])
    size = routing_info_bytes(packet, secret)
    changed = bytearray(packet[: 2 + 32 + size + 32])
    changed[40] ^= 1
    with pytest.raises(RemoteProtocolError, match="MAC"):
        open_header(bytes(changed), secret, geometry(size))
