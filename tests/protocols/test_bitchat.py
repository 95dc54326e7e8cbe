"""protocols.bitchat: properties (round trip, arbitrary bytes, re-encoding), strictness, limits and sessions."""

from __future__ import annotations

import dataclasses
import os
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from villagemesh.errors import ConfigError, LocalProtocolError, ProtocolError, RemoteProtocolError
from villagemesh.protocols import strategies as vst
from villagemesh.protocols.bitchat import (
    BROADCAST,
    Announcement,
    BitchatSession,
    Fragment,
    Limits,
    MessageType,
    NoisePayload,
    Packet,
    PrivateMessage,
    Reassembler,
    ReplayWindow,
    SessionInput,
    SessionState,
    decode,
    decode_announcement,
    decode_fragment,
    decode_noise_payload,
    decode_private_message,
    encode,
    encode_announcement,
    encode_fragment,
    encode_noise_payload,
    encode_private_message,
    fragment_packet,
    frame,
    pad,
    peer_id,
    sign,
    signing_bytes,
    unpad,
    unwrap,
    verify,
    wrap,
)
from villagemesh.protocols.bitchat import packet as packet_module
from villagemesh.protocols.bitchat.session import HANDSHAKE_SIZES, transition
from villagemesh.protocols.discovery import node_id_from_public_key
from villagemesh.protocols.envelope import Message, Priority, encode_message

SENDER = bytes(range(8))
TEXT = b"the quick brown fox jumps over the lazy dog " * 10  # compressible, > 100 bytes


def _packet(**fields) -> Packet:
    base = {"type": MessageType.MESSAGE, "sender_id": SENDER, "timestamp": 1, "payload": b"hi"}
    return Packet(**(base | fields))


# ---------------------------------------------------------------------------- properties


@given(vst.bitchat_packets(), st.booleans())
def test_every_packet_round_trips_padded_or_not(packet: Packet, padding: bool) -> None:
    assert decode(encode(packet, padding=padding)) == packet


@given(vst.bitchat_packets())
def test_a_decoded_packet_re_encodes_to_the_bytes_it_came_as(packet: Packet) -> None:
    wire = encode(packet)
    assert encode(decode(wire)) == wire
    assert encode(dataclasses.replace(decode(wire), ttl=0)) == encode(dataclasses.replace(packet, ttl=0))


@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_a_remote_protocol_error(data: bytes) -> None:
    for decoder in (decode, decode_announcement, decode_fragment, decode_private_message, decode_noise_payload):
        try:
            decoder(data)
        except RemoteProtocolError:
            pass


@given(vst.bitchat_packets(), st.binary(min_size=1, max_size=40))
def test_mutated_packets_decode_or_raise_a_remote_protocol_error(packet: Packet, noise: bytes) -> None:
    wire = bytearray(encode(packet))
    for i, byte in enumerate(noise):
        wire[(i * 7919 + byte) % len(wire)] ^= byte
    try:
        decode(bytes(wire))
    except RemoteProtocolError:
        pass


@given(vst.bitchat_announcements())
def test_every_announcement_round_trips(announcement: Announcement) -> None:
    assert decode_announcement(encode_announcement(announcement)) == announcement


@given(vst.bitchat_fragments())
def test_every_fragment_round_trips(fragment: Fragment) -> None:
    assert decode_fragment(encode_fragment(fragment)) == fragment


@given(vst.bitchat_packets(max_payload=3000), st.integers(20, 600), st.randoms(use_true_random=False))
def test_any_packet_fragments_and_reassembles_in_any_order(packet: Packet, limit: int, rng) -> None:
    pieces = fragment_packet(packet, limit, b"F" * 8)
    if len(frame(packet)) <= limit:
        assert pieces == [packet]
        return
    overhead = len(frame(pieces[0])) - len(decode_fragment(pieces[0].payload).data)
    assert all(len(frame(piece)) <= max(limit, 64 + overhead) for piece in pieces)
    rng.shuffle(pieces)
    reassembler = Reassembler()
    results = [reassembler.receive(piece, now=0.0) for piece in pieces]
    assert results[:-1] == [None] * (len(pieces) - 1) and results[-1] == packet
    assert len(reassembler) == 0


@given(st.binary(max_size=3000))
def test_padding_round_trips_and_fills_a_block_when_it_can(data: bytes) -> None:
    padded = pad(data)
    if len(data) + 16 > 2048 or _need(len(data)) > 255:
        assert padded == data
    else:
        assert len(padded) in (256, 512, 1024, 2048) and unpad(padded) == data


def _need(size: int) -> int:
    return next(block for block in (256, 512, 1024, 2048) if size + 16 <= block) - size


@given(vst.bitchat_packets(signed=False), vst.signing_keys())
def test_a_signed_packet_verifies_at_any_ttl_and_not_when_altered(unsigned: Packet, key: SigningKey) -> None:
    packet = sign(unsigned, key)
    public = bytes(key.verify_key)
    relayed = decode(encode(dataclasses.replace(packet, ttl=max(packet.ttl - 1, 0))))
    verify(relayed, public)
    with pytest.raises(RemoteProtocolError, match="does not verify"):
        verify(dataclasses.replace(packet, timestamp=packet.timestamp ^ 1), public)


@given(vst.bitchat_packets(signed=True, max_payload=50))
def test_the_strategy_signs_when_asked(packet: Packet) -> None:
    assert packet.signature is not None


# ---------------------------------------------------------------------------- packet rules


@pytest.mark.parametrize(
    "fields",
    [
        {"type": 256},
        {"ttl": -1},
        {"timestamp": 2**64},
        {"version": 3},
        {"sender_id": b"short"},
        {"recipient_id": b"x" * 9},
        {"route": (SENDER,)},  # v1
        {"route": (SENDER,) * 256, "version": 2},
        {"signature": b"s" * 63},
        {"payload": "text"},
    ],
)
def test_invalid_packets_are_refused_naming_the_value(fields) -> None:
    with pytest.raises(LocalProtocolError):
        _packet(**fields)


def test_a_payload_over_the_limit_is_refused_on_both_sides() -> None:
    with pytest.raises(LocalProtocolError, match="at most"):
        _packet(payload=bytes(packet_module.MAX_PAYLOAD_BYTES + 1))
    size = packet_module.MAX_PAYLOAD_BYTES + 1
    wire = bytes([2, 2, 7]) + bytes(8) + b"\x00" + size.to_bytes(4, "big") + SENDER + os.urandom(size)
    with pytest.raises(RemoteProtocolError, match="over the"):
        decode(wire)


def test_a_v1_payload_must_fit_two_length_bytes() -> None:
    with pytest.raises(LocalProtocolError, match="at most 65535"):
        encode(_packet(payload=os.urandom(0x10000)))
    assert decode(encode(_packet(payload=os.urandom(0x10000), version=2))).payload


def test_broadcast_is_no_recipient_or_all_ff() -> None:
    assert _packet().is_broadcast and _packet(recipient_id=BROADCAST).is_broadcast
    assert not _packet(recipient_id=SENDER).is_broadcast


def test_peer_id_is_the_first_eight_bytes_of_the_sha256_of_the_noise_key() -> None:
    assert peer_id(bytes(32)).hex() == "66687aadf862bd77"


def test_compressible_payloads_travel_as_raw_deflate_and_expand() -> None:
    wire = encode(_packet(payload=TEXT))
    assert wire[11] & 0x04 and len(wire) < len(TEXT)
    assert decode(wire).payload == TEXT
    random = decode(encode(_packet(payload=os.urandom(300))))
    assert random.wire == (random.payload, None)  # incompressible: sent as it is


def test_a_replaced_payload_is_compressed_afresh() -> None:
    received = decode(encode(_packet(payload=TEXT)))
    replaced = dataclasses.replace(received, payload=TEXT + b"!")
    assert decode(encode(replaced)).payload == TEXT + b"!"


def test_an_uncompressed_but_compressible_payload_is_re_encoded_uncompressed() -> None:
    # A client may not compress what we would; its signature covers the uncompressed bytes.
    header = bytes([1, 2, 7]) + bytes(8) + b"\x00" + len(TEXT).to_bytes(2, "big") + SENDER
    wire = header + TEXT
    assert encode(decode(wire)) == wire


def _compressed(body: bytes, version: int = 1, size: int | None = None) -> bytes:
    length = 2 if version == 1 else 4
    prefix = (len(TEXT) if size is None else size).to_bytes(length, "big")
    head = bytes([version, 2, 7]) + bytes(8) + b"\x04" + (len(prefix) + len(body)).to_bytes(length, "big") + SENDER
    return head + prefix + body


def test_zlib_wrapped_payloads_are_accepted_too() -> None:
    assert decode(_compressed(zlib.compress(TEXT))).payload == TEXT
    assert decode(_compressed(zlib.compress(TEXT), version=2)).payload == TEXT


@pytest.mark.parametrize(
    "wire, reason",
    [
        (b"", "version"),
        (b"\x03" + bytes(30), "version"),
        (bytes([1, 2, 7]) + bytes(8), "shorter than"),
        (bytes([1, 2, 7]) + bytes(8) + b"\x20\x00\x00" + SENDER, "unknown flag"),
        (bytes([1, 2, 7]) + bytes(8) + b"\x08\x00\x00" + SENDER, "route flag set in a v1"),
        (bytes([2, 2, 7]) + bytes(8) + b"\x08" + bytes(4) + SENDER, "route count"),
        (bytes([2, 2, 7]) + bytes(8) + b"\x08" + bytes(4) + SENDER + b"\x00", "empty route"),
        (bytes([2, 2, 7]) + bytes(8) + b"\x08" + bytes(4) + SENDER + b"\x02" + bytes(8), "route of 2 hops"),
        (bytes([1, 2, 7]) + bytes(8) + b"\x01\x00\x00" + SENDER + b"abc", "recipient id"),
        (bytes([1, 2, 7]) + bytes(8) + b"\x00\x00\x05" + SENDER + b"abc", "lengths say"),
        (bytes([1, 2, 7]) + bytes(8) + b"\x00\x00\x01" + SENDER + b"abc", "lengths say"),
        (_compressed(b"", size=5), "no DEFLATE bytes"),
        (_compressed(b"\x01", size=0), "out of range"),
        (_compressed(b"\x01", size=60_000), "out of range"),
        (_compressed(b"\xff\xff\xff"), "not DEFLATE"),
        (_compressed(zlib.compress(TEXT)[2:-4], size=len(TEXT) + 1), "exactly"),
        (_compressed(zlib.compress(TEXT)[2:-4], size=len(TEXT) - 1), "exactly"),
        (_compressed(zlib.compress(TEXT)[2:-4] + b"junk"), "exactly"),
        (_compressed(zlib.compress(TEXT)[2:-10]), "exactly"),
    ],
)
def test_malformed_packets_are_refused_by_name(wire: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        decode(wire)


def test_a_frame_with_valid_padding_that_hides_no_packet_names_both_readings() -> None:
    with pytest.raises(RemoteProtocolError, match="without its padding"):
        decode(b"\x01" + b"\x02" * 40 + b"\x01")


def test_noise_types_are_padded_on_the_link_and_others_not() -> None:
    assert len(frame(_packet(type=MessageType.NOISE_ENCRYPTED))) == 256
    assert len(frame(_packet())) == len(encode(_packet()))
    big = _packet(type=MessageType.NOISE_ENCRYPTED, payload=os.urandom(2100), version=2)
    assert frame(big) == encode(big)  # over the largest block: sent as it is
    assert unpad(b"") is None and unpad(b"ab\x00") is None and unpad(b"a\x03") is None and unpad(b"ab\x01\x02") is None


def test_signing_bytes_exclude_ttl_signature_and_rsr() -> None:
    key = SigningKey(bytes(32))
    signed = sign(_packet(rsr=True, ttl=7), key)
    assert signing_bytes(signed) == signing_bytes(_packet(ttl=0))
    verify(dataclasses.replace(signed, ttl=1, rsr=False), bytes(key.verify_key))


def test_verification_needs_a_signature_and_a_key_of_32_bytes() -> None:
    with pytest.raises(RemoteProtocolError, match="unsigned"):
        verify(_packet(), bytes(32))
    signed = sign(_packet(), SigningKey(bytes(32)))
    with pytest.raises(RemoteProtocolError, match="32 bytes"):
        verify(signed, b"short")
    with pytest.raises(RemoteProtocolError, match="does not verify"):
        verify(signed, bytes(SigningKey(b"\x01" * 32).verify_key))


# ---------------------------------------------------------------------------- announce and Noise payloads


def _announcement(**fields) -> Announcement:
    return Announcement(
        **({"nickname": "n", "noise_public_key": b"\x01" * 32, "signing_public_key": b"\x02" * 32} | fields)
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"noise_public_key": b"x"},
        {"signing_public_key": "k" * 32},
        {"neighbours": (SENDER,) * 11},
        {"neighbours": (b"x",)},
        {"geohash": "x" * 13},
        {"geohash": "é"},
        {"extensions": ((0x01, b""),)},
        {"extensions": ((256, b""),)},
    ],
)
def test_invalid_announcements_are_refused(fields) -> None:
    with pytest.raises(LocalProtocolError):
        _announcement(**fields)


def test_an_oversized_nickname_cannot_be_encoded() -> None:
    with pytest.raises(LocalProtocolError, match="over 255"):
        encode_announcement(_announcement(nickname="x" * 256))


def _tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind, len(value)]) + value


_REQUIRED = _tlv(1, b"n") + _tlv(2, b"\x01" * 32) + _tlv(3, b"\x02" * 32)


@pytest.mark.parametrize(
    "wire, reason",
    [
        (_REQUIRED + b"\x05", "truncated TLV header"),
        (_REQUIRED + _tlv(1, b"again"), "repeats"),
        (_tlv(1, b"n") + _tlv(2, b"\x01" * 32), "lacks required TLV 0x03"),
        (_tlv(1, b"n") + _tlv(2, b"\x01" * 31) + _tlv(3, b"\x02" * 32), "0x02 is 31 bytes"),
        (_REQUIRED + _tlv(4, bytes(9)), "neighbours"),
        (_REQUIRED + _tlv(4, bytes(88)), "neighbours"),
        (_REQUIRED + _tlv(6, "é".encode()), "geohash"),
        (_REQUIRED + _tlv(6, b"x" * 13), "geohash"),
        (_REQUIRED + _tlv(6, b"\xff"), "not UTF-8"),
        (_tlv(1, b"\xff") + _REQUIRED[3:], "not UTF-8"),
    ],
)
def test_malformed_announcements_are_refused_by_name(wire: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        decode_announcement(wire)


def test_announcements_in_any_order_decode_to_the_same_value() -> None:
    full = _announcement(neighbours=(SENDER,), geohash="u4pruyd", capabilities=b"\x01")
    wire = encode_announcement(full)
    reordered = wire[len(_REQUIRED) :] + _REQUIRED
    assert decode_announcement(reordered) == full


def test_noise_payloads_need_a_type_byte_and_private_messages_both_fields() -> None:
    with pytest.raises(RemoteProtocolError, match="no type byte"):
        decode_noise_payload(b"")
    with pytest.raises(LocalProtocolError, match="byte"):
        encode_noise_payload(NoisePayload(256, b""))
    assert decode_noise_payload(b"\x01abc") == NoisePayload(1, b"abc")
    with pytest.raises(RemoteProtocolError, match="0x00"):
        decode_private_message(_tlv(1, b"hi"))
    assert decode_private_message(encode_private_message(PrivateMessage("é", "ü")) + _tlv(9, b"")) == PrivateMessage(
        "é", "ü"
    )


# ---------------------------------------------------------------------------- fragments


def test_fragments_carry_the_original_header_fields_and_a_v2_header_only_with_a_route() -> None:
    original = _packet(payload=os.urandom(1000), recipient_id=BROADCAST, ttl=5)
    pieces = fragment_packet(original, 185, b"I" * 8)
    assert len(pieces) == 8  # chunk = 185 - 42 = 143 bytes of a 1022-byte frame
    assert {(p.type, p.sender_id, p.timestamp, p.ttl, p.recipient_id, p.version, p.signature) for p in pieces} == {
        (MessageType.FRAGMENT, SENDER, 1, 5, BROADCAST, 1, None)
    }
    routed = fragment_packet(dataclasses.replace(original, version=2, route=(SENDER,)), 185, b"I" * 8)
    assert {p.version for p in routed} == {2} and routed[0].route == (SENDER,)


def test_a_tiny_link_limit_still_gives_chunks_of_64_bytes() -> None:
    pieces = fragment_packet(_packet(payload=os.urandom(300)), 20, b"I" * 8)
    assert [len(decode_fragment(p.payload).data) for p in pieces] == [64] * 5 + [2]  # a 322-byte frame


def test_a_packet_needing_more_than_65535_fragments_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="65535"):
        fragment_packet(_packet(payload=os.urandom(65536 * 64 + 1), version=2), 20, b"I" * 8)


@pytest.mark.parametrize(
    "fields", [{"fragment_id": b"x"}, {"index": 3, "total": 3}, {"original_type": 300}, {"total": 0x10000}]
)
def test_invalid_fragments_are_refused(fields) -> None:
    with pytest.raises(LocalProtocolError):
        Fragment(**({"fragment_id": b"I" * 8, "index": 0, "total": 1, "original_type": 2, "data": b""} | fields))


def test_a_fragment_index_not_below_its_total_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="not below"):
        decode_fragment(b"I" * 8 + b"\x00\x03\x00\x03\x02")


def _pieces(payload: bytes = b"p" * 500, fid: bytes = b"I" * 8, limit: int = 150) -> list[Packet]:
    return fragment_packet(_packet(payload=os.urandom(len(payload))), limit, fid)


def test_duplicate_fragments_are_ignored() -> None:
    pieces = _pieces()
    reassembler = Reassembler()
    assert reassembler.receive(pieces[0], 0.0) is None
    assert reassembler.receive(pieces[0], 0.0) is None
    assert [reassembler.receive(p, 0.0) for p in pieces[1:]][-1] is not None


def test_a_message_of_too_many_fragments_is_refused_at_its_first() -> None:
    reassembler = Reassembler(Limits(max_fragments=3))
    with pytest.raises(RemoteProtocolError, match="over the limit of 3"):
        reassembler.receive(_pieces()[0], 0.0)
    assert reassembler.dropped == 1 and len(reassembler) == 0


def test_a_message_over_the_byte_limit_is_dropped() -> None:
    reassembler = Reassembler(Limits(max_bytes=200))
    pieces = _pieces()
    reassembler.receive(pieces[0], 0.0)
    with pytest.raises(RemoteProtocolError, match="over 200 bytes"):
        reassembler.receive(pieces[1], 0.0)
    assert len(reassembler) == 0 and reassembler.dropped == 1


def test_the_oldest_assembly_makes_room_for_a_new_one() -> None:
    reassembler = Reassembler(Limits(max_assemblies=2))
    for fid in (b"A" * 8, b"B" * 8, b"C" * 8):
        reassembler.receive(_pieces(fid=fid)[0], 0.0)
    assert len(reassembler) == 2 and reassembler.dropped == 1


def test_a_fragment_disagreeing_with_its_assembly_drops_it() -> None:
    reassembler = Reassembler()
    pieces = _pieces()
    reassembler.receive(pieces[0], 0.0)
    liar = decode_fragment(pieces[1].payload)
    lie = dataclasses.replace(pieces[1], payload=encode_fragment(dataclasses.replace(liar, original_type=9)))
    with pytest.raises(RemoteProtocolError, match="its first said"):
        reassembler.receive(lie, 0.0)
    assert len(reassembler) == 0


def _fragments_of(data: bytes, original_type: int = 2) -> list[Packet]:
    return [
        _packet(type=MessageType.FRAGMENT, payload=encode_fragment(Fragment(b"I" * 8, i, 2, original_type, half)))
        for i, half in enumerate((data[: len(data) // 2], data[len(data) // 2 :]))
    ]


def test_fragments_that_complete_into_no_packet_are_refused() -> None:
    reassembler = Reassembler()
    first, second = _fragments_of(b"not a packet at all")
    reassembler.receive(first, 0.0)
    with pytest.raises(RemoteProtocolError):
        reassembler.receive(second, 0.0)
    assert reassembler.dropped == 1


@pytest.mark.parametrize("inner", [_packet(type=3), _packet(sender_id=b"X" * 8)])
def test_fragments_that_complete_into_another_type_or_sender_are_refused(inner: Packet) -> None:
    reassembler = Reassembler()
    first, second = _fragments_of(encode(inner))
    reassembler.receive(first, 0.0)
    with pytest.raises(RemoteProtocolError, match="completed into"):
        reassembler.receive(second, 0.0)


def test_incomplete_messages_expire_when_the_caller_says_the_time() -> None:
    reassembler = Reassembler(Limits(timeout=30.0))
    old, new = _pieces(fid=b"O" * 8), _pieces(fid=b"N" * 8)
    reassembler.receive(old[0], 0.0)
    reassembler.receive(new[0], 20.0)
    assert reassembler.expire(29.9) == []
    assert reassembler.expire(30.0) == [(SENDER, b"O" * 8)]
    assert len(reassembler) == 1 and reassembler.dropped == 1


@pytest.mark.parametrize("fields", [{"max_fragments": 0}, {"max_bytes": 1.5}, {"timeout": 0}])
def test_invalid_limits_are_refused(fields) -> None:
    with pytest.raises(ConfigError):
        Limits(**fields)


# ---------------------------------------------------------------------------- Noise sessions


def _pair() -> tuple[BitchatSession, BitchatSession]:
    a, b = BitchatSession.initiator(os.urandom(32)), BitchatSession.responder(os.urandom(32))
    m1 = a.start()
    m2 = b.receive_handshake(m1)
    assert m2 is not None
    m3 = a.receive_handshake(m2)
    assert m3 is not None and b.receive_handshake(m3) is None
    assert [len(m) for m in (m1, m2, m3)] == list(HANDSHAKE_SIZES) == [32, 96, 64]
    return a, b


def test_sessions_handshake_and_exchange_with_explicit_nonces_in_any_order() -> None:
    a, b = _pair()
    assert a.established and b.established and a.handshake_hash == b.handshake_hash
    assert a.remote_peer_id == peer_id(b._handshake.s_pub) and b.remote_static == a._handshake.s_pub
    sealed = [a.encrypt(f"m{i}".encode()) for i in range(5)]
    assert [int.from_bytes(s[:4], "big") for s in sealed] == [0, 1, 2, 3, 4]
    assert [b.decrypt(s) for s in reversed(sealed)] == [f"m{i}".encode() for i in reversed(range(5))]
    assert a.decrypt(b.encrypt(b"back")) == b"back"


def test_a_replayed_or_forged_message_is_refused_and_the_session_goes_on() -> None:
    a, b = _pair()
    sealed = a.encrypt(b"once")
    b.decrypt(sealed)
    with pytest.raises(RemoteProtocolError, match="replay"):
        b.decrypt(sealed)
    with pytest.raises(RemoteProtocolError, match="authentication"):
        b.decrypt(a.encrypt(b"x")[:-1] + b"\x00")
    with pytest.raises(RemoteProtocolError, match="shorter"):
        b.decrypt(b"\x00" * 19)
    assert b.state is SessionState.TRANSPORT and b.decrypt(a.encrypt(b"still")) == b"still"


def test_the_replay_window_refuses_counters_too_far_behind() -> None:
    window = ReplayWindow(8)
    window.mark(0)
    window.mark(20)
    window.check(13)
    with pytest.raises(RemoteProtocolError, match="older than"):
        window.check(12)
    window.mark(15)
    with pytest.raises(RemoteProtocolError, match="replay"):
        window.check(15)
    window.mark(21)
    with pytest.raises(RemoteProtocolError, match="replay"):
        window.check(20)


def test_the_send_counter_stops_at_its_limit() -> None:
    a = BitchatSession(initiator=True, static=os.urandom(32), nonce_limit=1)
    b = BitchatSession.responder(os.urandom(32))
    a.receive_handshake(b.receive_handshake(a.start()) or b"")
    a.encrypt(b"one")
    with pytest.raises(LocalProtocolError, match="exhausted"):
        a.encrypt(b"two")
    assert a.state is SessionState.FAILED


def test_handshake_errors_are_terminal() -> None:
    a = BitchatSession.initiator(os.urandom(32))
    a.start()
    with pytest.raises(RemoteProtocolError, match="96 bytes"):
        a.receive_handshake(bytes(32))
    assert a.state is SessionState.FAILED
    with pytest.raises(RemoteProtocolError, match="FAILED"):
        a.receive_handshake(bytes(96))
    b = BitchatSession.responder(os.urandom(32))
    b.receive_handshake(BitchatSession.initiator(os.urandom(32)).start())
    with pytest.raises(RemoteProtocolError):
        b.receive_handshake(bytes(64))  # fails authentication
    assert b.state is SessionState.FAILED


def test_out_of_order_inputs_are_named_by_who_broke_the_rules() -> None:
    b = BitchatSession.responder(os.urandom(32))
    with pytest.raises(LocalProtocolError, match="START"):
        b.start()
    with pytest.raises(LocalProtocolError):
        BitchatSession.initiator(os.urandom(32)).encrypt(b"early")
    with pytest.raises(RemoteProtocolError):
        BitchatSession.responder(os.urandom(32)).decrypt(bytes(40))
    assert transition(SessionState.TRANSPORT, SessionInput.DECRYPT) is SessionState.TRANSPORT


@pytest.mark.parametrize("fields", [{"static": b"x"}, {"ephemeral": b"y"}, {"nonce_limit": 0}, {"nonce_limit": 2**33}])
def test_invalid_session_options_are_refused(fields) -> None:
    with pytest.raises(ConfigError):
        BitchatSession(**({"initiator": True, "static": bytes(32)} | fields))


# ---------------------------------------------------------------------------- villagemesh envelopes


KEY = SigningKey(b"\x07" * 32)
NODE = node_id_from_public_key(bytes(KEY.verify_key))


def _message(sender: str = NODE, payload: bytes = b"hello") -> Message:
    return Message(
        id=b"\x01" * 16,
        kind="TASK",
        sender=sender,
        recipient=None,
        priority=Priority.NORMAL,
        created_at=1.0,
        ttl=60.0,
        correlation_id=None,
        payload=payload,
    )


def test_an_envelope_rides_a_signed_0x56_packet_and_its_sender_is_the_signer() -> None:
    packet = wrap(_message(), KEY, SENDER, 1234, recipient_id=BROADCAST)
    assert packet.type == 0x56 and packet.version == 1 and packet.signature is not None
    received = decode(encode(dataclasses.replace(packet, ttl=3)))
    assert unwrap(received) == _message()
    assert wrap(_message(payload=bytes(70_000)), KEY, SENDER, 1).version == 2


def test_an_envelope_from_someone_else_cannot_be_wrapped_or_unwrapped() -> None:
    with pytest.raises(LocalProtocolError, match="not the node id"):
        wrap(_message(sender="f" * 32), KEY, SENDER, 1)
    public = bytes(KEY.verify_key)
    forged = sign(_packet(type=0x56, payload=public + encode_message(_message(sender="f" * 32))), KEY)
    with pytest.raises(RemoteProtocolError, match="not its signer"):
        unwrap(forged)
    other = SigningKey(b"\x08" * 32)
    swapped = sign(_packet(type=0x56, payload=public + encode_message(_message())), other)
    with pytest.raises(RemoteProtocolError, match="does not verify"):
        unwrap(swapped)


@pytest.mark.parametrize("packet", [_packet(), _packet(type=0x56, payload=b"short")])
def test_other_packets_carry_no_envelope(packet: Packet) -> None:
    with pytest.raises(RemoteProtocolError):
        unwrap(packet)


def test_every_error_here_is_a_protocol_error() -> None:
    assert issubclass(RemoteProtocolError, ProtocolError) and issubclass(LocalProtocolError, ProtocolError)
