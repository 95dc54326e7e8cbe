"""Sphinx packets: round trips over 1-5 hops, SURBs, tampering, replays, low-order points, fuzz.

What is checked externally, and what could not be: the format is this project's
own (the parameters of ../shared/research/mixnet.md §7: X25519, keyed BLAKE2b,
ChaCha20 from libsodium's AEAD body, LIONESS), so no published packet vector
matches it byte for byte. Katzenpost's X25519 Sphinx vectors derive keys with
HKDF-SHA256, encrypt β with AES-256-CTR and payloads with AEZ, none of which this
format uses; but the hop itself (``open_header``: DH, MAC over AD ‖ α ‖ β, β
decrypted over β ‖ 0^hop, α blinded) is the same, and test_sphinx_katzenpost.py
runs their packets through it with their primitives. Checked against published
vectors here: the two primitives this
format shares with everyone, X25519 (RFC 7748 §5.2) and the ChaCha20 stream and
its block counter (RFC 8439 §2.4.2). What pins the format itself is the golden
digest below (a packet built from a fixed byte source); what checks its security
properties are the properties below.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from villagemesh.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from villagemesh.protocols import strategies as vst
from villagemesh.protocols.framing import NEED_DATA
from villagemesh.protocols.sphinx import (
    HEADER_BYTES,
    MAX_DELAY_MS,
    MAX_MESSAGE,
    PACKET_BYTES,
    Deliver,
    Forward,
    Hop,
    PacketReader,
    ReplayCache,
    SurbReply,
    create_packet,
    create_surb,
    crypto,
    packet,
    surb_reply,
    unwrap,
)
from villagemesh.protocols.sphinx.crypto import lioness_decrypt, lioness_encrypt, x25519_base

SLOW = settings(max_examples=25, deadline=None)
E = 493_000  # an epoch (hours since 1970, in 2026)


def route(packet_bytes: bytes, secrets: list[bytes], path: list[Hop]) -> tuple[Any, list[int]]:
    """Run a packet through every hop of ``path``; the last hop's result and each packet's size on the way."""
    sizes = [len(packet_bytes)]
    for i, secret in enumerate(secrets):
        result = unwrap(packet_bytes, secret, ReplayCache())
        if isinstance(result, Forward):
            assert result.next_node == path[i + 1].node_id
            packet_bytes = result.packet
            sizes.append(len(packet_bytes))
    return result, sizes


def seeded(seed: bytes):
    """A deterministic byte source (BLAKE2b in counter mode) for reproducible packets."""
    counter = itertools.count()

    def random_bytes(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.blake2b(seed + next(counter).to_bytes(8, "big")).digest()
        return out[:n]

    return random_bytes


def fixed_path(hops: int = 3) -> tuple[list[bytes], list[Hop]]:
    secrets = [hashlib.sha256(b"mix %d" % i).digest() for i in range(hops)]
    return secrets, [Hop(bytes([i]) * 16, x25519_base(s)) for i, s in enumerate(secrets)]


@SLOW
@given(vst.sphinx_paths(), vst.sphinx_messages(), st.data())
def test_a_message_crosses_one_to_five_hops_at_one_fixed_size(path: Any, message: bytes, data: Any) -> None:
    secrets, hops = path
    delays = data.draw(st.lists(st.integers(0, MAX_DELAY_MS), min_size=len(hops) - 1, max_size=len(hops) - 1))
    result, sizes = route(create_packet(hops, message, delays, epoch=E), secrets, hops)
    assert isinstance(result, Deliver) and result.message == message
    assert set(sizes) == {PACKET_BYTES}


def test_each_hop_reads_the_delay_the_sender_chose_for_it() -> None:
    secrets, hops = fixed_path(4)
    p = create_packet(hops, b"m", [5, 600_000, 0], epoch=E)
    seen = []
    for secret in secrets[:-1]:
        result = unwrap(p, secret, ReplayCache())
        assert isinstance(result, Forward)
        seen.append(result.delay_ms)
        p = result.packet
    assert seen == [5, 600_000, 0]


def test_the_format_is_pinned_by_a_golden_digest() -> None:
    """A packet from a fixed byte source always has the same bytes (a change of format changes this digest)."""
    _, hops = fixed_path(3)
    first = create_packet(hops, b"golden", [1, 2], epoch=E, random_bytes=seeded(b"golden"))
    again = create_packet(hops, b"golden", [1, 2], epoch=E, random_bytes=seeded(b"golden"))
    assert first == again
    assert hashlib.sha256(first).hexdigest() == GOLDEN


GOLDEN = "cbf3715700c17ff0c79a16efaf81ec5d6b6ad113c91b9ff53f825699cee95661"


@SLOW
@given(vst.sphinx_paths(min_hops=2), vst.sphinx_messages())
def test_a_surb_reply_reaches_its_creator_and_opens_once(path: Any, message: bytes) -> None:
    secrets, hops = path
    surb, keys = create_surb(hops, [0] * (len(hops) - 1), epoch=E)
    first_hop, p = surb_reply(surb, message)
    assert first_hop == hops[0].node_id and len(p) == PACKET_BYTES
    result, sizes = route(p, secrets, hops)
    assert isinstance(result, SurbReply) and set(sizes) == {PACKET_BYTES}
    assert keys.open(result) == message


def test_a_second_reply_on_one_surb_is_refused_as_a_replay_at_the_first_hop() -> None:
    secrets, hops = fixed_path(2)
    surb, _ = create_surb(hops, [0], epoch=E)
    cache = ReplayCache()
    unwrap(surb_reply(surb, b"one")[1], secrets[0], cache)
    with pytest.raises(RemoteProtocolError, match="replayed"):
        unwrap(surb_reply(surb, b"two")[1], secrets[0], cache)


def test_a_changed_surb_reply_fails_when_its_creator_opens_it() -> None:
    secrets, hops = fixed_path(2)
    surb, keys = create_surb(hops, [0], epoch=E)
    _, p = surb_reply(surb, b"reply")
    p = p[:-1] + bytes([p[-1] ^ 1])
    result, _ = route(p, secrets, hops)
    with pytest.raises(RemoteProtocolError, match="integrity"):
        keys.open(result)
    _, other_keys = create_surb(hops, [0], epoch=E)
    with pytest.raises(LocalProtocolError, match="opened with"):
        other_keys.open(result)


def test_a_replayed_packet_is_refused_and_a_cleared_cache_forgets() -> None:
    secrets, hops = fixed_path(2)
    p = create_packet(hops, b"once", [0], epoch=E)
    cache = ReplayCache()
    unwrap(p, secrets[0], cache)
    with pytest.raises(RemoteProtocolError, match="replayed"):
        unwrap(p, secrets[0], cache)
    assert len(cache) == 1
    cache.clear()
    assert len(cache) == 0 and isinstance(unwrap(p, secrets[0], cache), Forward)


def test_a_mix_accepts_only_the_epochs_it_names_each_with_its_own_cache() -> None:
    """The epoch is in the MAC'd header: a packet of an epoch the mix no longer accepts is refused whatever its tag."""
    secrets, hops = fixed_path(1)
    caches = {E - 1: ReplayCache(), E: ReplayCache()}
    old, now = create_packet(hops, b"old", [], epoch=E - 1), create_packet(hops, b"now", [], epoch=E)
    assert unwrap(old, secrets[0], caches).epoch == E - 1 and unwrap(now, secrets[0], caches).epoch == E
    assert (len(caches[E - 1]), len(caches[E])) == (1, 1)
    with pytest.raises(RemoteProtocolError, match=f"epoch {E - 2} is not one this mix accepts"):
        unwrap(create_packet(hops, b"older", [], epoch=E - 2), secrets[0], caches)
    forged = bytearray(old)
    forged[1:5] = E.to_bytes(4, "big")  # an old packet relabelled with the current epoch
    with pytest.raises(RemoteProtocolError, match="MAC"):
        unwrap(bytes(forged), secrets[0], caches)


def test_a_full_replay_cache_refuses_rather_than_forgets() -> None:
    secrets, hops = fixed_path(1)
    cache = ReplayCache(capacity=1)
    unwrap(create_packet(hops, b"a", [], epoch=E), secrets[0], cache)
    with pytest.raises(LocalProtocolError, match="full"):
        unwrap(create_packet(hops, b"b", [], epoch=E), secrets[0], cache)
    with pytest.raises(LocalProtocolError, match="capacity 0"):
        ReplayCache(capacity=0)


def test_alpha_with_its_ignored_top_bit_flipped_is_refused() -> None:
    """X25519 ignores bit 255, so the shared secret is the same: the MAC over α catches it."""
    secrets, hops = fixed_path(1)
    p = bytearray(create_packet(hops, b"m", [], epoch=E))
    p[1 + 31] ^= 0x80
    with pytest.raises(RemoteProtocolError, match="MAC"):
        unwrap(bytes(p), secrets[0], ReplayCache())


@SLOW
@given(st.integers(0, HEADER_BYTES - 1), st.integers(0, 7))
def test_any_flipped_header_bit_is_refused_at_the_first_hop(index: int, bit: int) -> None:
    secrets, hops = fixed_path(3)
    p = bytearray(create_packet(hops, b"m", [0, 0], epoch=E, random_bytes=seeded(b"tamper")))
    p[index] ^= 1 << bit
    cache = ReplayCache()
    with pytest.raises(RemoteProtocolError):
        unwrap(bytes(p), secrets[0], cache)
    assert len(cache) == 0, "a refused packet must not enter the replay cache"


@SLOW
@given(st.integers(HEADER_BYTES, PACKET_BYTES - 1), st.integers(0, 7))
def test_a_flipped_payload_bit_garbles_only_that_packet_and_fails_at_the_recipient(index: int, bit: int) -> None:
    secrets, hops = fixed_path(3)
    p = bytearray(create_packet(hops, b"m", [0, 0], epoch=E))
    p[index] ^= 1 << bit
    for secret in secrets[:-1]:
        result = unwrap(bytes(p), secret, ReplayCache())
        assert isinstance(result, Forward)
        p = bytearray(result.packet)
    with pytest.raises(RemoteProtocolError, match="integrity"):
        unwrap(bytes(p), secrets[-1], ReplayCache())


def test_a_low_order_alpha_is_refused() -> None:
    secrets, _ = fixed_path(1)
    p = bytes([1]) + bytes(32) + bytes(PACKET_BYTES - 33)
    with pytest.raises(RemoteProtocolError, match="low order"):
        unwrap(p, secrets[0], ReplayCache())


def test_a_packet_for_another_key_is_refused() -> None:
    _, hops = fixed_path(2)
    with pytest.raises(RemoteProtocolError, match="MAC"):
        unwrap(create_packet(hops, b"m", [0], epoch=E), os.urandom(32), ReplayCache())


@pytest.mark.parametrize("value", [b"", b"\x01" * (PACKET_BYTES - 1), b"\x01" * (PACKET_BYTES + 1), "text", None])
def test_a_packet_of_another_size_or_type_is_refused_naming_it(value: Any) -> None:
    with pytest.raises(RemoteProtocolError, match="a packet is"):
        unwrap(value, os.urandom(32), ReplayCache())


def test_an_unknown_version_is_refused() -> None:
    secrets, hops = fixed_path(1)
    p = create_packet(hops, b"m", [], epoch=E)
    with pytest.raises(RemoteProtocolError, match="version 9"):
        unwrap(bytes([9]) + p[1:], secrets[0], ReplayCache())


def test_an_unknown_command_and_an_absurd_delay_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers valid in every other way, built with the checks lifted (what a hostile sender could do)."""
    secrets, hops = fixed_path(2)
    header, _ = packet._header(hops[:1], [], bytes([7]) + bytes(packet.HOP_BYTES - 1), E, os.urandom)
    with pytest.raises(RemoteProtocolError, match="unknown routing command 7"):
        unwrap(header + bytes(packet.PAYLOAD_BYTES), secrets[0], ReplayCache())
    monkeypatch.setattr(packet, "MAX_DELAY_MS", 2**32 - 1)
    p = create_packet(hops, b"m", [MAX_DELAY_MS + 1], epoch=E)
    monkeypatch.setattr(packet, "MAX_DELAY_MS", MAX_DELAY_MS)
    with pytest.raises(RemoteProtocolError, match="above"):
        unwrap(p, secrets[0], ReplayCache())


def test_a_payload_claiming_more_than_it_holds_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="claims 65535"):
        packet._open_body(bytes(32) + b"\xff\xff" + bytes(MAX_MESSAGE))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=PACKET_BYTES, max_size=PACKET_BYTES) | st.binary(max_size=3000))
def test_random_bytes_only_ever_raise_a_protocol_error(data: bytes) -> None:
    try:
        unwrap(data, b"\x07" * 32, ReplayCache())
    except ProtocolError:
        pass
    else:  # pragma: no cover - a random packet passing a 256-bit MAC
        pytest.fail("random bytes were accepted as a packet")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda h: create_packet([], b"m", [], epoch=E), "1 to 5 hops"),
        (lambda h: create_packet(h * 2, b"m", [0] * 5, epoch=E), "1 to 5 hops"),
        (lambda h: create_packet(h[:1], b"m", [], epoch=-1), "epoch is 0 to"),
        (lambda h: create_packet(h[:1], b"m", [], epoch=2**32), "epoch is 0 to"),
        (lambda h: create_packet(h[:2], b"m", [], epoch=E), "need 1 delays"),
        (lambda h: create_packet([Hop(b"x", h[0].public_key)], b"m", [], epoch=E), "16-byte id"),
        (lambda h: create_packet(h[:2], b"m", [-1], epoch=E), "got -1"),
        (lambda h: create_packet(h[:2], b"m", [MAX_DELAY_MS + 1], epoch=E), "600000"),
        (lambda h: create_packet(h[:1], bytes(MAX_MESSAGE + 1), [], epoch=E), "at most 2014"),
        (lambda h: surb_reply(packet.Surb(b"x", b"short", bytes(128)), b"m"), "SURB has"),
        (lambda h: lioness_encrypt(bytes(10), bytes(64)), "key must be 128"),
        (lambda h: lioness_decrypt(bytes(128), bytes(32)), "longer than 32"),
    ],
)
def test_a_sender_breaking_the_rules_gets_a_local_protocol_error_naming_the_value(call: Any, match: str) -> None:
    _, hops = fixed_path(3)
    with pytest.raises(LocalProtocolError, match=match):
        call(hops)


@given(st.binary(min_size=33, max_size=4096), st.binary(min_size=128, max_size=128))
def test_lioness_round_trips(block: bytes, key: bytes) -> None:
    assert lioness_decrypt(key, lioness_encrypt(key, block)) == block


def test_one_flipped_lioness_bit_changes_nearly_every_byte() -> None:
    key, block = os.urandom(128), os.urandom(2048)
    cipher = bytearray(lioness_encrypt(key, block))
    cipher[1000] ^= 1
    garbled = lioness_decrypt(key, bytes(cipher))
    assert sum(a != b for a, b in zip(garbled, block, strict=True)) > 0.9 * len(block)


@given(st.binary(max_size=3000), st.binary(min_size=32, max_size=32), st.binary(min_size=12, max_size=12))
def test_the_stream_is_the_aead_body_of_the_public_wrapper(data: bytes, key: bytes, nonce: bytes) -> None:
    import nacl.bindings

    expected = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(data, None, nonce, key)[:-16]
    assert crypto.stream_xor(key, nonce, data) == expected


def test_x25519_is_rfc_7748() -> None:
    """RFC 7748 §5.2, the first test vector."""
    scalar = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    point = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    assert crypto.x25519(scalar, point).hex() == "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"


def test_the_stream_is_chacha20_from_block_one() -> None:
    """RFC 8439 §2.4.2's vector: key 00..1f, nonce 000000000000004a00000000, counter 1."""
    key = bytes(range(32))
    nonce = bytes.fromhex("000000000000004a00000000")
    plaintext = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen"
    assert crypto.stream_xor(key, nonce, plaintext)[:16].hex() == "6e2e359a2568f98041ba0728dd0d6981"


@SLOW
@given(st.lists(vst.sphinx_messages(), min_size=1, max_size=3), st.data())
def test_any_chunking_of_a_link_gives_the_same_packets(messages: list[bytes], data: Any) -> None:
    _, hops = fixed_path(1)
    packets = [create_packet(hops, m, [], epoch=E) for m in messages]
    stream = b"".join(packets)
    reader = PacketReader()
    got = []
    for chunk in data.draw(vst.chunkings(stream)):
        reader.receive_data(chunk)
        while (item := reader.next_packet()) is not NEED_DATA:
            got.append(item)
    assert got == packets
