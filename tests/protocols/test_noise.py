"""The secure channel: Noise XX checked against the cacophony vector and the noiseprotocol package,
identity binding, the transition table, nonce limits, rekeying and hostile input."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_aead_chacha20poly1305_ietf_decrypt, crypto_aead_chacha20poly1305_ietf_encrypt
from nacl.exceptions import CryptoError
from nacl.signing import SigningKey
from noise.connection import Keypair, NoiseConnection

from villagemesh.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from villagemesh.protocols import strategies as vst
from villagemesh.protocols.noise import (
    BULK_MIN,
    HEADER,
    MAX_FRAME,
    MAX_PLAINTEXT,
    NEED_DATA,
    PROTOCOL_NAME,
    BytesLike,
    ChannelInput,
    ChannelState,
    CipherState,
    Data,
    HandshakeComplete,
    SecureChannel,
    XXHandshake,
    identity_payload,
    seal,
    transition,
    unseal,
)
from villagemesh.protocols.sniff import Sniffed, sniff

# noiseprotocol warns when a test fixes the ephemeral keys, which is what these tests do on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:One of ephemeral keypairs is already set")

VECTOR = json.loads((Path(__file__).parent / "data" / "noise_xx_25519_chachapoly_sha256.json").read_text())

I_STATIC, I_EPH = bytes(range(32)), bytes(range(100, 132))
R_STATIC, R_EPH = bytes(range(32, 64)), bytes(range(150, 182))
I_ID, R_ID = SigningKey(bytes([7]) * 32), SigningKey(bytes([9]) * 32)
keys32 = st.binary(min_size=32, max_size=32)


def channels(**options: object) -> tuple[SecureChannel, SecureChannel]:
    init_options = {"ephemeral": I_EPH, **options}
    resp_options = {"ephemeral": R_EPH, **options}
    return (
        SecureChannel.initiator(I_STATIC, I_ID, **init_options),
        SecureChannel.responder(R_STATIC, R_ID, **resp_options),
    )


def events(channel: SecureChannel, data: bytes = b"") -> list[object]:
    channel.receive_data(data)
    out = []
    while (event := channel.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def handshake(**options: object) -> tuple[SecureChannel, SecureChannel]:
    initiator, responder = channels(**options)
    assert events(responder, initiator.data_to_send()) == []
    [done_i] = events(initiator, responder.data_to_send())
    [done_r] = events(responder, initiator.data_to_send())
    assert isinstance(done_i, HandshakeComplete) and isinstance(done_r, HandshakeComplete)
    return initiator, responder


def initiator_stream(messages: list[bytes]) -> tuple[bytes, SecureChannel]:
    """Everything an initiator sends in a session carrying ``messages``, and a fresh responder to feed it to.

    The initiator talks to a probe responder with the same fixed keys, so the
    fresh responder derives the same session and can read the whole stream.
    """
    initiator, responder = channels()
    probe = SecureChannel.responder(R_STATIC, R_ID, ephemeral=R_EPH)
    first = initiator.data_to_send()
    events(probe, first)
    events(initiator, probe.data_to_send())
    return first + initiator.data_to_send() + b"".join(initiator.send(m) for m in messages), responder


def initiator_done() -> HandshakeComplete:
    """The event a responder gets when the handshake with the fixed initiator completes."""
    return HandshakeComplete(bytes(I_ID.verify_key), XXHandshake(True, I_STATIC).s_pub)


def deframe(data: bytes) -> list[bytes]:
    out = []
    while data:
        (size,) = struct.unpack(">H", data[:2])
        out.append(data[2 : 2 + size])
        data = data[2 + size :]
    return out


# ---------------------------------------------------------------------------- known answers


def test_raw_noise_layer_reproduces_the_cacophony_vector() -> None:
    """Our XX handshake and transport give the published ciphertexts and handshake hash byte for byte."""
    h = bytes.fromhex
    assert VECTOR["protocol_name"].encode() == PROTOCOL_NAME
    init = XXHandshake(True, h(VECTOR["init_static"]), h(VECTOR["init_prologue"]), h(VECTOR["init_ephemeral"]))
    resp = XXHandshake(False, h(VECTOR["resp_static"]), h(VECTOR["resp_prologue"]), h(VECTOR["resp_ephemeral"]))
    messages = VECTOR["messages"]
    for i, message in enumerate(messages[:3]):
        writer, reader = (init, resp) if i % 2 == 0 else (resp, init)
        assert writer.write_message(h(message["payload"])).hex() == message["ciphertext"]
        assert reader.read_message(h(message["ciphertext"])).hex() == message["payload"]
    assert init.complete and resp.complete
    assert init.handshake_hash.hex() == resp.handshake_hash.hex() == VECTOR["handshake_hash"]
    (i_send, i_recv), (r_send, r_recv) = init.split(), resp.split()
    for i, message in enumerate(messages[3:]):
        # Transport messages keep alternating: responder, initiator, responder.
        send, recv = (r_send, i_recv) if i % 2 == 0 else (i_send, r_recv)
        assert send.encrypt(b"", h(message["payload"])).hex() == message["ciphertext"]
        assert recv.decrypt(b"", h(message["ciphertext"])).hex() == message["payload"]


def _noise_peer(initiator: bool, static: bytes, ephemeral: bytes) -> NoiseConnection:
    peer = NoiseConnection.from_name(PROTOCOL_NAME)
    if initiator:
        peer.set_as_initiator()
    else:
        peer.set_as_responder()
    peer.set_keypair_from_private_bytes(Keypair.STATIC, static)
    peer.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
    peer.set_prologue(HEADER)
    peer.start_handshake()
    return peer


def _noise_transcript(i_static: bytes, i_eph: bytes, r_static: bytes, r_eph: bytes) -> list[bytes]:
    """Handshake messages between two noiseprotocol peers with villagemesh's prologue and identity payloads."""
    init = _noise_peer(True, i_static, i_eph)
    resp = _noise_peer(False, r_static, r_eph)
    i_pub, r_pub = XXHandshake(True, i_static).s_pub, XXHandshake(False, r_static).s_pub
    m1 = bytes(init.write_message(b""))
    resp.read_message(m1)
    m2 = bytes(resp.write_message(identity_payload(R_ID, r_pub)))
    init.read_message(m2)
    m3 = bytes(init.write_message(identity_payload(I_ID, i_pub)))
    resp.read_message(m3)
    return [m1, m2, m3, init.get_handshake_hash()]


@settings(max_examples=10, deadline=None)
@given(keys32, keys32, keys32, keys32)
def test_handshake_transcript_matches_noiseprotocol_byte_for_byte(
    i_static: bytes, i_eph: bytes, r_static: bytes, r_eph: bytes
) -> None:
    """With the same fixed keys, our channel's handshake bytes equal two noiseprotocol peers' bytes."""
    initiator = SecureChannel.initiator(i_static, I_ID, ephemeral=i_eph)
    responder = SecureChannel.responder(r_static, R_ID, ephemeral=r_eph)
    first = initiator.data_to_send()
    assert first.startswith(HEADER)
    events(responder, first)
    second = responder.data_to_send()
    events(initiator, second)
    third = initiator.data_to_send()
    events(responder, third)
    ours = [*deframe(first[len(HEADER) :]), *deframe(second), *deframe(third), initiator.handshake_hash]
    assert ours == _noise_transcript(i_static, i_eph, r_static, r_eph)


@pytest.mark.parametrize("we_initiate", [True, False])
def test_channel_interoperates_with_noiseprotocol_including_rekeys(we_initiate: bool) -> None:
    """Our channel and a noiseprotocol peer complete the handshake and exchange data across rekeys."""
    interval = 3
    if we_initiate:
        expected = bytes(R_ID.verify_key)
        ours = SecureChannel.initiator(I_STATIC, I_ID, rekey_interval=interval, expected_identity=expected)
        peer, peer_static, peer_id = _noise_peer(False, R_STATIC, R_EPH), R_STATIC, R_ID
        peer.read_message(deframe(ours.data_to_send()[len(HEADER) :])[0])
        peer_pub = XXHandshake(False, peer_static).s_pub
        [done] = events(ours, SecureChannel._frame(bytes(peer.write_message(identity_payload(peer_id, peer_pub)))))
        payload = peer.read_message(deframe(ours.data_to_send())[0])
    else:
        ours = SecureChannel.responder(R_STATIC, R_ID, rekey_interval=interval)
        peer, peer_static, peer_id = _noise_peer(True, I_STATIC, I_EPH), I_STATIC, I_ID
        assert events(ours, HEADER + SecureChannel._frame(bytes(peer.write_message(b"")))) == []
        payload = peer.read_message(deframe(ours.data_to_send())[0])
        peer_pub = XXHandshake(True, peer_static).s_pub
        [done] = events(ours, SecureChannel._frame(bytes(peer.write_message(identity_payload(peer_id, peer_pub)))))
    assert peer.handshake_finished and done == HandshakeComplete(bytes(peer_id.verify_key), peer_pub)
    assert ours.handshake_hash == peer.get_handshake_hash()
    assert payload[:32] == bytes((I_ID if we_initiate else R_ID).verify_key)
    for n in range(1, 10):
        message = bytes([n]) * (n * 1000)
        assert bytes(peer.decrypt(deframe(ours.send(message))[0])) == message
        assert events(ours, SecureChannel._frame(bytes(peer.encrypt(message[::-1])))) == [Data(message[::-1])]
        if n % interval == 0:
            peer.rekey_inbound_cipher()
            peer.rekey_outbound_cipher()


# ---------------------------------------------------------------------------- the channel


def test_initiator_opens_with_the_magic_header_the_sniffer_recognises() -> None:
    """The first bytes on the wire are HEADER, and sniff() says SECURE."""
    initiator, _ = channels()
    first = initiator.data_to_send()
    assert first.startswith(HEADER) and sniff(first) is Sniffed.SECURE
    assert initiator.data_to_send() == b""
    assert initiator.state is ChannelState.AWAIT_MESSAGE_2


def test_handshake_authenticates_both_identities() -> None:
    """Each side learns the other's Ed25519 identity and X25519 static key."""
    initiator, responder = channels()
    events(responder, initiator.data_to_send())
    [done_i] = events(initiator, responder.data_to_send())
    [done_r] = events(responder, initiator.data_to_send())
    assert done_i == HandshakeComplete(bytes(R_ID.verify_key), XXHandshake(False, R_STATIC).s_pub)
    assert done_r == initiator_done()
    assert initiator.remote_identity == bytes(R_ID.verify_key)
    assert initiator.state is responder.state is ChannelState.TRANSPORT
    assert initiator.handshake_hash == responder.handshake_hash


@settings(max_examples=25, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=4), st.data())
def test_any_chunking_of_the_stream_gives_the_same_events(messages: list[bytes], data: st.DataObject) -> None:
    """Handshake and data arrive as the same events however the initiator's bytes are split."""
    stream, responder = initiator_stream(messages)
    received: list[object] = []
    for chunk in data.draw(vst.chunkings(stream)):
        received.extend(events(responder, chunk))
    assert received == [initiator_done(), *(Data(m) for m in messages if m)]


@settings(deadline=None)
@given(st.binary(max_size=400), st.data())
def test_random_bytes_to_a_responder_raise_only_remote_protocol_errors(raw: bytes, data: st.DataObject) -> None:
    """Garbage (with or without a valid header) is a RemoteProtocolError, and the channel stays failed."""
    _, responder = channels()
    prefix = data.draw(st.sampled_from([b"", HEADER, HEADER + b"\x00\x20"]))
    try:
        for chunk in data.draw(vst.chunkings(prefix + raw)):
            events(responder, chunk)
    except RemoteProtocolError:
        assert responder.state is ChannelState.FAILED
        with pytest.raises(RemoteProtocolError, match="already failed"):
            responder.next_event()
        with pytest.raises(LocalProtocolError, match="FAILED"):
            responder.send(b"x")


@settings(deadline=None)
@given(st.binary(max_size=400), st.data())
def test_random_bytes_after_the_handshake_raise_only_remote_protocol_errors(raw: bytes, data: st.DataObject) -> None:
    """Forged transport frames never decrypt: only RemoteProtocolError or NEED_DATA."""
    _, responder = handshake()
    try:
        for chunk in data.draw(vst.chunkings(raw)):
            assert events(responder, chunk) == []
    except RemoteProtocolError:
        assert responder.state is ChannelState.FAILED


def test_a_transport_frame_shorter_than_its_tag_is_a_remote_protocol_error() -> None:
    """A length prefix cut below 16 (a tampered stream found it): a typed error, not the crypto library's ValueError."""
    _, responder = handshake()
    with pytest.raises(RemoteProtocolError, match="shorter than its 16-byte tag"):
        events(responder, b"\x00\x05hello")
    assert responder.state is ChannelState.FAILED


@settings(deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=100), min_size=1, max_size=3), st.data())
def test_tampered_streams_never_yield_altered_data(messages: list[bytes], data: st.DataObject) -> None:
    """Flipping any byte of a whole session gives a prefix of the true events, then an error or NEED_DATA."""
    raw, responder = initiator_stream(messages)
    stream = bytearray(raw)
    stream[data.draw(st.integers(0, len(stream) - 1))] ^= data.draw(st.integers(1, 255))
    expected = [initiator_done(), *(Data(m) for m in messages)]
    received: list[object] = []
    responder.receive_data(bytes(stream))
    try:
        while (event := responder.next_event()) is not NEED_DATA:
            received.append(event)
    except RemoteProtocolError:
        assert responder.state is ChannelState.FAILED
    assert received == expected[: len(received)] and len(received) < len(expected)


def test_large_sends_are_split_into_maximal_frames() -> None:
    """send() cuts data into frames of at most 65535 bytes, and the peer gets it back whole."""
    initiator, responder = handshake()
    data = bytes(range(256)) * 600
    wire = initiator.send(data)
    frames = deframe(wire)
    assert [len(f) for f in frames] == [MAX_FRAME, MAX_FRAME, len(data) - 2 * MAX_PLAINTEXT + 16]
    assert b"".join(e.data for e in events(responder, wire)) == data  # type: ignore[attr-defined]
    assert initiator.send(b"") == b""
    assert events(initiator, responder.send(bytearray(b"back"))) == [Data(b"back")]  # type: ignore[arg-type]


def test_sending_before_the_handshake_is_a_local_error_and_terminal() -> None:
    """send() while handshaking is our bug: LocalProtocolError, then the channel is FAILED."""
    initiator, _ = channels()
    with pytest.raises(LocalProtocolError, match="SEND in state AWAIT_MESSAGE_2"):
        initiator.send(b"too early")
    assert initiator.state is ChannelState.FAILED
    with pytest.raises(RemoteProtocolError, match="already failed"):
        initiator.next_event()


def test_identity_that_did_not_sign_the_static_key_is_rejected() -> None:
    """A payload signing some other static key fails verification."""
    initiator, responder = channels()
    responder._identity_payload = identity_payload(R_ID, bytes(32))
    events(responder, initiator.data_to_send())
    with pytest.raises(RemoteProtocolError, match="did not sign"):
        events(initiator, responder.data_to_send())


def test_unexpected_peer_identity_is_rejected() -> None:
    """A dialer that asked for a specific identity refuses anyone else."""
    initiator, responder = channels(expected_identity=bytes(32))
    events(responder, initiator.data_to_send())
    with pytest.raises(RemoteProtocolError, match="not the expected"):
        events(initiator, responder.data_to_send())


def test_responder_checks_the_initiators_identity_too() -> None:
    """The responder verifies message 3's identity payload."""
    initiator, responder = channels()
    initiator._identity_payload = bytes(96)
    events(responder, initiator.data_to_send())
    events(initiator, responder.data_to_send())
    with pytest.raises(RemoteProtocolError, match="did not sign"):
        events(responder, initiator.data_to_send())


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"VMSX\x01", "not a villagemesh secure channel"),
        (b"VMSC\x02", "version 2"),
        (HEADER + b"\x00\x21", "exceeds the limit of 32"),
        (HEADER + b"\x00\x1f" + bytes(31), "must be 32 bytes"),
        (HEADER + b"\x00\x20" + bytes(32), "invalid X25519 public key"),
    ],
)
def test_bad_openings_are_remote_errors_with_a_reason(data: bytes, reason: str) -> None:
    """Wrong magic, wrong version, wrong sizes and low-order keys are refused by name."""
    _, responder = channels()
    with pytest.raises(RemoteProtocolError, match=reason):
        events(responder, data)


def test_oversized_frame_length_is_rejected_before_the_body_arrives() -> None:
    """Message 2's length is checked as soon as its two bytes arrive."""
    initiator, _ = channels()
    with pytest.raises(RemoteProtocolError, match="exceeds the limit of 192"):
        events(initiator, b"\x00\xc1")


def test_send_nonce_limit_is_a_hard_stop() -> None:
    """At the (injected) nonce limit sending stops for good: LocalProtocolError, FAILED."""
    initiator, responder = handshake(nonce_limit=3)
    for n in range(3):
        assert events(responder, initiator.send(bytes([n]))) == [Data(bytes([n]))]
    with pytest.raises(LocalProtocolError, match="nonce exhausted at 3"):
        initiator.send(b"one too many")
    assert initiator.state is ChannelState.FAILED


def test_receive_nonce_limit_is_a_hard_stop() -> None:
    """A peer sending past our nonce limit is a RemoteProtocolError."""
    initiator, responder = handshake()
    responder._recv_cs.nonce_limit = 2  # type: ignore[union-attr]
    wire = b"".join(initiator.send(b"x") for _ in range(3))
    with pytest.raises(RemoteProtocolError, match="past the nonce limit"):
        events(responder, wire)


def test_rekey_changes_the_key_every_interval() -> None:
    """Both ends rekey after each interval; a peer that does not rekey cannot read message interval + 1."""
    initiator, responder = handshake(rekey_interval=2)
    for n in range(7):
        assert events(responder, initiator.send(b"m%d" % n)) == [Data(b"m%d" % n)]
        assert events(initiator, responder.send(b"r%d" % n)) == [Data(b"r%d" % n)]
    sender, lagging = handshake(rekey_interval=2)
    lagging._rekey_interval = None
    assert events(lagging, sender.send(b"a") + sender.send(b"b")) == [Data(b"a"), Data(b"b")]
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        events(lagging, sender.send(b"c"))


def test_rekey_can_be_switched_off() -> None:
    """rekey_interval=None keeps the handshake keys for the whole session."""
    initiator, responder = handshake(rekey_interval=None)
    key = initiator._send_cs.key  # type: ignore[union-attr]
    for n in range(5):
        assert events(responder, initiator.send(bytes([n]))) == [Data(bytes([n]))]
    assert initiator._send_cs.key == key  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"static": b"short"}, "static"),
        ({"ephemeral": "x" * 32}, "ephemeral"),
        ({"expected_identity": bytes(31)}, "expected_identity"),
        ({"identity": bytes(32)}, "identity"),
        ({"rekey_interval": 0}, "rekey_interval"),
        ({"nonce_limit": 2**64}, "nonce_limit"),
    ],
)
def test_bad_configuration_is_a_config_error_naming_the_value(options: dict[str, object], named: str) -> None:
    """Unusable keys or limits are refused at construction."""
    args: dict[str, object] = {"initiator": True, "static": I_STATIC, "identity": I_ID, **options}
    with pytest.raises(ConfigError, match=named):
        SecureChannel(**args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the table and the raw layer


@given(st.sampled_from(ChannelState), st.sampled_from(ChannelInput))
def test_transition_table_allows_a_pair_or_assigns_blame(state: ChannelState, event: ChannelInput) -> None:
    """Every (state, input) either leads to a live state or raises the error naming who broke the rules."""
    local = event in (ChannelInput.START, ChannelInput.SEND)
    try:
        next_state = transition(state, event)
    except LocalProtocolError:
        assert local
    except RemoteProtocolError:
        assert not local
    else:
        assert next_state is not ChannelState.FAILED and state is not ChannelState.FAILED


def test_raw_handshake_refuses_out_of_turn_use() -> None:
    """Writing or reading out of turn, and truncated messages, are refused by XXHandshake itself."""
    init = XXHandshake(True, I_STATIC)
    resp = XXHandshake(False, R_STATIC)
    with pytest.raises(LocalProtocolError, match="not our turn"):
        resp.write_message(b"")
    with pytest.raises(LocalProtocolError, match="not the peer's turn"):
        init.read_message(bytes(32))
    resp.read_message(init.write_message(b""))
    message_2 = resp.write_message(b"")
    with pytest.raises(RemoteProtocolError, match="truncated at 'e'"):
        init.read_message(message_2[:10])
    with pytest.raises(RemoteProtocolError, match="truncated at 's'"):
        # A fresh reader: the failed one above is not reused.
        other = XXHandshake(True, I_STATIC)
        XXHandshake(False, R_STATIC).read_message(other.write_message(b""))
        other.read_message(message_2[:40])


def test_cipher_state_without_a_key_passes_bytes_through() -> None:
    """Before a key exists, Noise's EncryptWithAd/DecryptWithAd are the identity."""
    cs = CipherState()
    assert cs.encrypt(b"ad", b"plain") == b"plain" and cs.decrypt(b"ad", b"plain") == b"plain"


@given(
    st.binary(max_size=2000),
    st.binary(max_size=40),
    st.binary(min_size=12, max_size=12),
    st.binary(min_size=32, max_size=32),
)
@settings(max_examples=60)
def test_seal_and_unseal_are_pynacls_chacha20_poly1305(plaintext: bytes, ad: bytes, nonce: bytes, key: bytes) -> None:
    sealed = seal(plaintext, ad, nonce, key)
    assert sealed == crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)
    assert (
        unseal(sealed, ad, nonce, key) == plaintext == crypto_aead_chacha20poly1305_ietf_decrypt(sealed, ad, nonce, key)
    )
    tampered = bytes([sealed[0] ^ 1]) + sealed[1:]
    assert unseal(tampered, ad, nonce, key) is None


class RecordingAead:
    """A :class:`BulkAead` that counts its calls and seals with libsodium (through the module's own calls)."""

    made: list[bytes] = []

    def __init__(self, key: bytes) -> None:
        self.key, self.calls = key, 0
        RecordingAead.made.append(key)

    def seal_into(self, nonce: bytes, plaintext: BytesLike, ad: bytes, out: memoryview) -> None:
        self.calls += 1
        out[:] = crypto_aead_chacha20poly1305_ietf_encrypt(bytes(plaintext), ad, nonce, self.key)

    def open_into(self, nonce: bytes, ciphertext: BytesLike, ad: bytes, out: memoryview) -> bool:
        self.calls += 1
        try:
            out[:] = crypto_aead_chacha20poly1305_ietf_decrypt(bytes(ciphertext), ad, nonce, self.key)
        except CryptoError:
            return False
        return True


@pytest.mark.parametrize("size", [0, 44, BULK_MIN - 1, BULK_MIN, 65519])
def test_a_bulk_cipher_handed_in_seals_and_opens_the_transport_frames_as_libsodium_does(size: int) -> None:
    """``CipherState.use``: the bulk calls of ``BULK_MIN`` bytes or more go to the cipher handed in (keyed
    anew on rekey), smaller ones to libsodium; None goes back to libsodium for all."""
    key, plaintext = os.urandom(32), os.urandom(size)
    bulk, plain = CipherState(key), CipherState(key)
    bulk.use(RecordingAead)
    sealed = []
    for cipher in (bulk, plain):
        out = bytearray(size + 20)
        cipher.encrypt_into(b"ad", plaintext, out, 4)
        sealed.append(bytes(out[4:]))
    assert sealed[0] == sealed[1] == crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, b"ad", bytes(12), key)
    for use in (RecordingAead, None):
        cipher = CipherState(key)
        cipher.use(use)
        out = bytearray(size + 3)
        assert cipher.decrypt_into(b"ad", sealed[0], out, 3) == size and out[3:] == plaintext
        with pytest.raises(RemoteProtocolError, match="frame 1 failed authentication"):
            cipher.decrypt_into(b"ad", sealed[0], out, 3)  # nonce 1 now: the tag does not verify
    assert isinstance(bulk._bulk, RecordingAead) and bulk._bulk.calls == (size >= BULK_MIN)  # small: libsodium
    bulk.rekey()
    assert RecordingAead.made[-1] == bulk.key != key  # the bulk cipher follows the key
    bulk.use(None)
    assert bulk._bulk is None
