"""libp2p's /noise: our session against the independent ``noiseprotocol`` package carrying libp2p payloads,
against itself, and against every way a peer can lie (wrong key type, bad signature, other peer id)."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_scalarmult_base
from nacl.signing import SigningKey
from noise.connection import Keypair, NoiseConnection

from tests.protocols.shuttle import pump
from tests.protocols.test_noise import RecordingAead
from villagemesh.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from villagemesh.protocols import strategies as vst
from villagemesh.protocols.libp2p.noise import (
    MAX_PLAINTEXT,
    SIGNATURE_PREFIX,
    Authenticated,
    Data,
    NoiseSession,
    handshake_payload,
    verify_payload,
)
from villagemesh.protocols.libp2p.peerid import ED25519_KEY_PROTO_PREFIX, PeerId
from villagemesh.protocols.libp2p.protobuf import encode_bytes_field, encode_varint_field, parse_fields
from villagemesh.protocols.noise import BULK_MIN, CipherState

NAME = b"Noise_XX_25519_ChaChaPoly_SHA256"


def party() -> tuple[bytes, SigningKey]:
    return os.urandom(32), SigningKey.generate()


def test_two_sessions_learn_each_others_peer_ids_and_exchange_data() -> None:
    (s1, id1), (s2, id2) = party(), party()
    dialer = NoiseSession.initiator(s1, id1, expected_peer=PeerId.from_ed25519(bytes(id2.verify_key)))
    listener = NoiseSession.responder(s2, id2)
    at_dialer, at_listener = pump(dialer, listener)
    assert at_dialer == [Authenticated(PeerId.from_ed25519(bytes(id2.verify_key)), bytes(id2.verify_key))]
    assert at_listener == [Authenticated(PeerId.from_ed25519(bytes(id1.verify_key)), bytes(id1.verify_key))]
    assert dialer.handshake_hash == listener.handshake_hash
    big = os.urandom(MAX_PLAINTEXT * 2 + 5)
    dialer.send(big)
    got = listener.receive_data(dialer.data_to_send())
    assert [len(e.data) for e in got] == [MAX_PLAINTEXT, MAX_PLAINTEXT, 5] and b"".join(e.data for e in got) == big


def test_the_message_sizes_are_the_specs_for_ed25519() -> None:
    (s1, id1), (s2, id2) = party(), party()
    dialer, listener = NoiseSession.initiator(s1, id1), NoiseSession.responder(s2, id2)
    m1 = dialer.data_to_send()
    listener.receive_data(m1)
    m2 = listener.data_to_send()
    dialer.receive_data(m2)
    m3 = dialer.data_to_send()
    assert (len(m1), len(m2), len(m3)) == (2 + 32, 2 + 200, 2 + 168)  # research/libp2p.md §3.1


def _libp2p_noiseprotocol_peer(initiator: bool, static: bytes) -> NoiseConnection:
    peer = NoiseConnection.from_name(NAME)
    peer.set_as_initiator() if initiator else peer.set_as_responder()
    peer.set_keypair_from_private_bytes(Keypair.STATIC, static)
    peer.start_handshake()
    return peer


def _frame(message: bytes) -> bytes:
    return len(message).to_bytes(2, "big") + message


def _unframe(data: bytes | bytearray) -> list[bytes]:
    data, out = bytes(data), []  # our output is a bytearray (the buffer encrypted into, not copied)
    while data:
        size = int.from_bytes(data[:2], "big")
        out.append(data[2 : 2 + size])
        data = data[2 + size :]
    return out


@pytest.mark.parametrize("we_dial", [True, False])
def test_our_session_interoperates_with_the_noiseprotocol_package_carrying_libp2p_payloads(we_dial: bool) -> None:
    """An independent Noise implementation, given the libp2p payload and framing by hand, agrees with ours."""
    (ours_static, ours_id), (their_static, their_id) = party(), party()
    their_payload = handshake_payload(their_id, crypto_scalarmult_base(their_static))
    theirs = _libp2p_noiseprotocol_peer(not we_dial, their_static)
    if we_dial:
        expected = PeerId.from_ed25519(bytes(their_id.verify_key))
        ours = NoiseSession.initiator(ours_static, ours_id, expected_peer=expected)
        [m1] = _unframe(ours.data_to_send())
        theirs.read_message(m1)
        assert ours.receive_data(_frame(theirs.write_message(their_payload)))[0].identity == bytes(their_id.verify_key)
        [m3] = _unframe(ours.data_to_send())
        peer_id, _ = verify_payload(theirs.read_message(m3), crypto_scalarmult_base(ours_static))
    else:
        ours = NoiseSession.responder(ours_static, ours_id)
        ours.receive_data(_frame(theirs.write_message(b"")))
        [m2] = _unframe(ours.data_to_send())
        peer_id, _ = verify_payload(theirs.read_message(m2), crypto_scalarmult_base(ours_static))
        assert ours.receive_data(_frame(theirs.write_message(their_payload)))[0].identity == bytes(their_id.verify_key)
    assert peer_id == PeerId.from_ed25519(bytes(ours_id.verify_key))
    assert theirs.handshake_finished and theirs.get_handshake_hash() == ours.handshake_hash
    ours.send(b"to noiseprotocol")
    assert theirs.decrypt(_unframe(ours.data_to_send())[0]) == b"to noiseprotocol"
    assert ours.receive_data(_frame(theirs.encrypt(b"from noiseprotocol"))) == [Data(b"from noiseprotocol")]


def test_a_dialer_refuses_a_peer_that_proves_another_id() -> None:
    (s1, id1), (s2, id2) = party(), party()
    someone_else = PeerId.from_ed25519(bytes(SigningKey.generate().verify_key))
    dialer, listener = NoiseSession.initiator(s1, id1, expected_peer=someone_else), NoiseSession.responder(s2, id2)
    listener.receive_data(dialer.data_to_send())
    with pytest.raises(RemoteProtocolError, match="dialled"):
        dialer.receive_data(listener.data_to_send())
    with pytest.raises(LocalProtocolError, match="failed"):
        dialer.receive_data(b"")


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "only Ed25519"),
        (encode_bytes_field(1, bytes([0x08, 0x00, 0x12, 0x20]) + bytes(32)), "only Ed25519"),
        (encode_bytes_field(1, ED25519_KEY_PROTO_PREFIX + bytes(32)) + encode_bytes_field(2, bytes(64)), "does not"),
        (encode_varint_field(1, 5), "must be bytes"),
    ],
)
def test_a_payload_that_does_not_prove_an_ed25519_identity_is_refused(payload: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        verify_payload(payload, os.urandom(32))


def test_a_signature_over_another_static_key_is_refused() -> None:
    identity = SigningKey.generate()
    payload = handshake_payload(identity, os.urandom(32))
    with pytest.raises(RemoteProtocolError, match="does not verify"):
        verify_payload(payload, os.urandom(32))
    assert SIGNATURE_PREFIX == b"noise-libp2p-static-key:"


def test_wrong_sizes_of_the_first_two_messages_are_refused() -> None:
    (s1, id1), (s2, id2) = party(), party()
    with pytest.raises(RemoteProtocolError, match="message 1 is 32 bytes"):
        NoiseSession.responder(s2, id2).receive_data(_frame(bytes(31)))
    dialer = NoiseSession.initiator(s1, id1)
    with pytest.raises(RemoteProtocolError, match="message 2 is at least"):
        dialer.receive_data(_frame(bytes(40)))


def test_sending_before_the_handshake_is_a_local_protocol_error() -> None:
    s1, id1 = party()
    with pytest.raises(LocalProtocolError, match="cannot send while handshaking"):
        NoiseSession.initiator(s1, id1).send(b"early")


@settings(max_examples=50)
@given(st.binary(max_size=400))
def test_random_bytes_only_ever_raise_a_protocol_error(data: bytes) -> None:
    s, identity = party()
    for session in (NoiseSession.responder(s, identity), NoiseSession.initiator(s, identity)):
        try:
            session.receive_data(data)
        except ProtocolError:
            pass


@settings(max_examples=30)
@given(st.data())
def test_any_chunking_of_the_handshake_gives_the_same_events(data: Any) -> None:
    (s1, id1), (s2, id2) = party(), party()
    dialer, listener = NoiseSession.initiator(s1, id1), NoiseSession.responder(s2, id2)
    got = []
    for chunk in data.draw(vst.chunkings(dialer.data_to_send())):
        got += listener.receive_data(chunk)
    assert got == []
    m2 = listener.data_to_send()
    for chunk in data.draw(vst.chunkings(m2)):
        got += dialer.receive_data(chunk)
    assert [type(e) for e in got] == [Authenticated]


# -- the protobuf subset --------------------------------------------------------------------------


def test_protobuf_fields_round_trip_repeat_and_keep_unknown_ones() -> None:
    data = encode_bytes_field(1, b"a") + encode_varint_field(3, 300) + encode_bytes_field(1, b"b")
    assert parse_fields(data) == {1: [b"a", b"b"], 3: [300]}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x08", "cut inside field 1"),
        (b"\x0a\x05ab", "claims 5 bytes"),
        (b"\x0d\x00\x00\x00\x00", "wire type 5"),
        (b"\x00\x01", "field number 0"),
        (b"\x80", "cut inside a field key"),
        (b"\x0a", "cut inside the length"),
        (b"\x00" * ((1 << 20) + 1), "more than"),
    ],
)
def test_malformed_protobuf_is_a_remote_protocol_error(data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        parse_fields(data)


@given(st.binary(max_size=100))
def test_random_protobuf_bytes_only_ever_raise_a_protocol_error(data: bytes) -> None:
    try:
        parse_fields(data)
    except ProtocolError:
        pass


def _transport_pair() -> tuple[NoiseSession, NoiseSession]:
    (s1, id1), (s2, id2) = party(), party()
    dialer, listener = NoiseSession.initiator(s1, id1), NoiseSession.responder(s2, id2)
    pump(dialer, listener)
    return dialer, listener


@given(st.lists(st.integers(0, MAX_PLAINTEXT * 2 + 3), max_size=6), st.data())
@settings(max_examples=30, deadline=None)
def test_frames_share_messages_while_they_fit_and_only_a_larger_one_is_cut(sizes: list[int], data: Any) -> None:
    """What a muxer hands over frame by frame arrives whole, in any chunking, and a frame that fits one
    message is never cut in two (its peer reads it where it was decrypted)."""
    dialer, listener = _transport_pair()
    frames = [bytes([n % 251]) * size for n, size in enumerate(sizes)]
    dialer.send_frames(frames)
    wire = bytes(dialer.data_to_send())
    got: list[Any] = []
    for chunk in data.draw(vst.chunkings(wire)):
        got += listener.receive_data(memoryview(chunk))
    assert b"".join(e.data for e in got) == b"".join(frames)
    assert all(len(e.data) <= MAX_PLAINTEXT for e in got)
    spans, at = [], 0
    for event in got:
        spans.append((at, at + len(event.data)))
        at += len(event.data)
    for i, size in enumerate(sizes):
        start = sum(sizes[:i])
        if 0 < size <= MAX_PLAINTEXT:  # a frame that fits a message lies in one
            assert any(begin <= start and start + size <= end for begin, end in spans)


def test_frames_that_fit_one_message_travel_each_in_one_and_nothing_sends_nothing() -> None:
    dialer, listener = _transport_pair()
    dialer.send_frames([])
    assert dialer.data_to_send() == b""
    frames = [b"a" * 12, b"b" * (MAX_PLAINTEXT - 12), b"c" * 40, b"d" * (MAX_PLAINTEXT - 12), b""]
    dialer.send_frames(frames)
    got = listener.receive_data(dialer.data_to_send())
    fill = MAX_PLAINTEXT - 12
    assert [bytes(e.data) for e in got] == [b"a" * 12 + b"b" * fill, b"c" * 40, b"d" * fill]
    dialer.send(b"")  # an empty message still goes (and decrypts to nothing)
    assert listener.receive_data(dialer.data_to_send()) == [Data(b"")]


def test_a_sender_stops_before_its_nonces_run_out() -> None:
    dialer, _ = _transport_pair()
    assert dialer._send is not None
    dialer._send.nonce_limit = dialer._send.n
    with pytest.raises(LocalProtocolError, match="nonce exhausted"):
        dialer.send(b"one too many")


@given(st.lists(st.integers(0, MAX_PLAINTEXT * 2 + 3), max_size=6), st.data())
@settings(max_examples=30, deadline=None)
def test_borrowed_views_carry_what_owned_buffers_do_in_any_chunking(sizes: list[int], data: Any) -> None:
    """``receive_borrowed`` gives the same plaintexts as ``receive_data``, each view read before the next call."""
    dialer, owned = _transport_pair()
    assert owned._receive is not None and owned._receive.n == 0
    borrowing = copy.copy(owned)  # the same session (keys, state), but a receive side of its own
    borrowing._in, borrowing._receive = bytearray(), CipherState(owned._receive.key)
    dialer.send_frames([os.urandom(size) for size in sizes])
    wire = bytes(dialer.data_to_send())
    chunks = data.draw(vst.chunkings(wire))
    expected = [bytes(e.data) for chunk in chunks for e in owned.receive_data(chunk)]
    got = []
    for chunk in chunks:
        got += [bytes(e.data) for e in borrowing.receive_borrowed(bytearray(chunk))]
    assert got == expected


def test_a_length_prefix_split_after_its_first_byte_is_waited_for() -> None:
    dialer, listener = _transport_pair()
    dialer.send(b"split")
    wire = bytes(dialer.data_to_send())
    assert listener.receive_borrowed(wire[:1]) == []
    assert listener.receive_borrowed(wire[1:2]) == []
    assert [bytes(e.data) for e in listener.receive_borrowed(wire[2:])] == [b"split"]


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (b"\x00\x05hello", "shorter than its 16-byte tag"),
        (b"\x00\x11" + bytes(17), "failed authentication"),
    ],
)
def test_a_bad_frame_read_into_the_borrowed_buffer_fails_the_session(wire: bytes, match: str) -> None:
    _, listener = _transport_pair()
    with pytest.raises(RemoteProtocolError, match=match):
        listener.receive_borrowed(wire)
    with pytest.raises(LocalProtocolError, match="has failed"):
        listener.receive_borrowed(b"")


def test_a_peer_past_the_receive_nonce_limit_is_cut_off_on_the_borrowed_path_too() -> None:
    dialer, listener = _transport_pair()
    assert listener._receive is not None
    listener._receive.nonce_limit = listener._receive.n + 1
    dialer.send(b"one")
    dialer.send(b"two")
    with pytest.raises(RemoteProtocolError, match="past the nonce limit"):
        listener.receive_borrowed(dialer.data_to_send())


def test_a_bulk_cipher_handed_to_a_session_carries_its_transport_frames() -> None:
    """``bulk=``: both directions' transport frames go through the cipher handed in, the handshake does not."""
    (s1, id1), (s2, id2) = party(), party()
    dialer = NoiseSession.initiator(s1, id1, bulk=RecordingAead)
    listener = NoiseSession.responder(s2, id2, bulk=RecordingAead)
    pump(dialer, listener)
    dialer.send(b"a ping goes to libsodium")
    dialer.send(b"x" * BULK_MIN)
    got = [bytes(e.data) for e in listener.receive_borrowed(dialer.data_to_send())]
    assert got == [b"a ping goes to libsodium", b"x" * BULK_MIN]
    assert dialer._send is not None and listener._receive is not None
    assert [dialer._send._bulk.calls, listener._receive._bulk.calls] == [1, 1]  # type: ignore[union-attr]
