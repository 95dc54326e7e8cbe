"""Authenticated sessions over an in-memory pipe: chunking, spoofed senders, expected peers, tampering."""

from __future__ import annotations

import dataclasses
import os
import struct

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from villagemesh.actors.core.secure.session import Authenticated, EnvelopeReceived, Rejected, Session, SessionEvent
from villagemesh.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from villagemesh.protocols import strategies as vst
from villagemesh.protocols.discovery import node_id_from_public_key
from villagemesh.protocols.envelope import (
    MAX_MESSAGE_BYTES,
    MAX_PAYLOAD_BYTES,
    Message,
    Priority,
    encode_message,
    frame_message,
)
from villagemesh.protocols.noise import MAX_PLAINTEXT, NEED_DATA, SecureChannel

I_KEY, R_KEY, M_KEY = SigningKey(bytes([1]) * 32), SigningKey(bytes([2]) * 32), SigningKey(bytes([3]) * 32)
I_STATIC, R_STATIC, M_STATIC = bytes([11]) * 32, bytes([12]) * 32, bytes([13]) * 32
I_ID, R_ID, M_ID = (node_id_from_public_key(bytes(k.verify_key)) for k in (I_KEY, R_KEY, M_KEY))


def pair(expected_peer: str | None = R_ID) -> tuple[Session, Session]:
    return Session.initiator(I_STATIC, I_KEY, expected_peer=expected_peer), Session.responder(R_STATIC, R_KEY)


def connected() -> tuple[Session, Session]:
    """An initiator and a responder whose handshake is complete."""
    initiator, responder = pair()
    assert responder.receive_data(initiator.data_to_send()) == []
    [done_i] = initiator.receive_data(responder.data_to_send())
    [done_r] = responder.receive_data(initiator.data_to_send())
    assert done_i == Authenticated(R_ID, bytes(R_KEY.verify_key))
    assert done_r == Authenticated(I_ID, bytes(I_KEY.verify_key))
    return initiator, responder


def message(sender: str, payload: bytes = b"hello", **fields: object) -> Message:
    values: dict[str, object] = {
        "id": os.urandom(16),
        "kind": "DATA",
        "sender": sender,
        "recipient": None,
        "priority": Priority.NORMAL,
        "created_at": 1.0,
        "ttl": 60.0,
        "correlation_id": None,
        "payload": payload,
    }
    values.update(fields)
    return Message(**values)  # type: ignore[arg-type]


def attacker() -> tuple[SecureChannel, Session]:
    """A peer speaking the raw channel (not our Session, so it can send anything), handshake done."""
    channel = SecureChannel.initiator(M_STATIC, M_KEY)
    responder = Session.responder(R_STATIC, R_KEY)
    responder.receive_data(channel.data_to_send())
    channel.receive_data(responder.data_to_send())
    while channel.next_event() is not NEED_DATA:
        pass
    assert responder.receive_data(channel.data_to_send()) == [Authenticated(M_ID, bytes(M_KEY.verify_key))]
    return channel, responder


def test_handshake_authenticates_both_node_ids() -> None:
    """After the handshake each side knows the other's node id, derived from its identity key."""
    initiator, responder = connected()
    assert (initiator.peer_id, responder.peer_id) == (R_ID, I_ID)
    assert initiator.authenticated and responder.authenticated
    assert initiator.handshake_hash == responder.handshake_hash


def test_envelopes_flow_both_ways() -> None:
    """Each side's envelopes arrive at the other, decoded, with the raw bytes as sent."""
    initiator, responder = connected()
    ping, pong = message(I_ID, b"ping"), message(R_ID, b"pong", correlation_id=os.urandom(16))
    assert responder.receive_data(initiator.send_envelope(encode_message(ping))) == [
        EnvelopeReceived(ping, encode_message(ping))
    ]
    assert initiator.receive_data(responder.send_envelope(encode_message(pong))) == [
        EnvelopeReceived(pong, encode_message(pong))
    ]
    assert initiator.counts == {"sent": 1, "received": 1}


@settings(deadline=None, max_examples=30)
@given(st.lists(vst.messages(max_payload=512), max_size=4), st.data())
def test_any_chunking_of_the_stream_gives_the_same_events(messages: list[Message], data: st.DataObject) -> None:
    """However the initiator's bytes are cut, the responder sees Authenticated and then every envelope."""
    own = [dataclasses.replace(m, sender=I_ID) for m in messages]
    initiator, responder = pair()
    events: list[SessionEvent] = []
    for chunk in data.draw(vst.chunkings(initiator.data_to_send())):
        events += responder.receive_data(chunk)
    initiator.receive_data(responder.data_to_send())
    rest = initiator.data_to_send() + b"".join(initiator.send_envelope(encode_message(m)) for m in own)
    for chunk in data.draw(vst.chunkings(rest)):
        events += responder.receive_data(chunk)
    expected = [Authenticated(I_ID, bytes(I_KEY.verify_key))] + [EnvelopeReceived(m, encode_message(m)) for m in own]
    assert events == expected


def test_envelope_larger_than_a_noise_frame_arrives_whole() -> None:
    """A 1 MiB payload spans many Noise frames and arrives as one envelope."""
    initiator, responder = connected()
    big = message(I_ID, os.urandom(MAX_PAYLOAD_BYTES))
    wire = initiator.send_envelope(encode_message(big))
    assert len(wire) > 16 * MAX_PLAINTEXT
    events: list[SessionEvent] = []
    for start in range(0, len(wire), 50_000):
        events += responder.receive_data(wire[start : start + 50_000])
    assert events == [EnvelopeReceived(big, encode_message(big))]


def test_spoofed_sender_is_rejected_counted_and_logged_and_the_session_goes_on() -> None:
    """An authenticated peer claiming another node's id gets its envelope refused, not delivered."""
    channel, responder = attacker()
    spoofed, honest = message(I_ID), message(M_ID)
    with structlog.testing.capture_logs() as logs:
        events = responder.receive_data(channel.send(frame_message(spoofed) + frame_message(honest)))
    assert len(events) == 2
    assert isinstance(events[0], Rejected) and I_ID in events[0].reason and M_ID in events[0].reason
    assert events[1] == EnvelopeReceived(honest, encode_message(honest))
    assert responder.counts["rejected.sender"] == 1 and responder.counts["received"] == 1
    [logged] = [e for e in logs if e["event"] == "envelope_rejected"]
    assert logged["kind"] == "sender" and logged["peer_id"] == M_ID


def test_undecodable_envelope_is_rejected_and_the_session_goes_on() -> None:
    """A well-framed body that is not an envelope is a Rejected event; the next envelope still arrives."""
    channel, responder = attacker()
    honest = message(M_ID)
    garbage = b"\x07not an envelope"
    events = responder.receive_data(channel.send(struct.pack(">I", len(garbage)) + garbage + frame_message(honest)))
    assert isinstance(events[0], Rejected) and "undecodable" in events[0].reason
    assert events[1:] == [EnvelopeReceived(honest, encode_message(honest))]
    assert responder.counts["rejected.envelope"] == 1


def test_oversized_envelope_length_is_fatal_before_the_body_arrives() -> None:
    """A length prefix above MAX_MESSAGE_BYTES kills the session at once, and for good."""
    channel, responder = attacker()
    with pytest.raises(RemoteProtocolError, match=str(MAX_MESSAGE_BYTES + 1)):
        responder.receive_data(channel.send(struct.pack(">I", MAX_MESSAGE_BYTES + 1)))
    assert responder.failed and not responder.authenticated
    with pytest.raises(RemoteProtocolError, match="already failed"):
        responder.receive_data(channel.send(frame_message(message(M_ID))))


@settings(deadline=None, max_examples=50)
@given(st.binary(max_size=2000), st.booleans())
def test_arbitrary_bytes_yield_only_rejections_or_a_remote_protocol_error(raw: bytes, inside: bool) -> None:
    """Garbage on the wire, or garbage an authenticated peer encrypts, never delivers anything else."""
    if inside:
        channel, responder = attacker()
        wire = channel.send(raw)
    else:
        responder, wire = Session.responder(R_STATIC, R_KEY), raw
    try:
        events = responder.receive_data(wire)
    except RemoteProtocolError:
        return
    for event in events:
        assert isinstance(event, Rejected) or (isinstance(event, EnvelopeReceived) and event.message.sender == M_ID)


def test_wrong_expected_peer_is_fatal_naming_both_ids() -> None:
    """A dialler that reaches a node other than the one it dialled stops with both ids in the error."""
    initiator, responder = pair(expected_peer=M_ID)
    responder.receive_data(initiator.data_to_send())
    with pytest.raises(RemoteProtocolError, match=f"expected peer {M_ID}, got {R_ID}"):
        initiator.receive_data(responder.data_to_send())
    assert initiator.failed and initiator.peer_id is None
    with pytest.raises(LocalProtocolError, match="already failed"):
        initiator.send_envelope(encode_message(message(I_ID)))


def test_responder_may_insist_on_a_peer_too() -> None:
    """A responder built with expected_peer refuses any other initiator."""
    initiator = Session.initiator(I_STATIC, I_KEY, expected_peer=None)
    responder = Session.responder(R_STATIC, R_KEY, expected_peer=M_ID)
    responder.receive_data(initiator.data_to_send())
    initiator.receive_data(responder.data_to_send())
    with pytest.raises(RemoteProtocolError, match=f"expected peer {M_ID}, got {I_ID}"):
        responder.receive_data(initiator.data_to_send())


def _flip(data: bytes, at: int, mask: int) -> bytes:
    return data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :]


def _tampered_run(raws: list[bytes], from_initiator: bool, index: int | None, mask: int) -> tuple[list[bytes], int]:
    """Handshake, then the chosen side sends ``raws``; byte ``index`` of that direction's stream is flipped.

    Returns the raw envelopes the receiving side delivered and the direction's stream length.
    """
    initiator, responder = pair()
    sent = {True: 0, False: 0}  # bytes so far, by "from the initiator"
    delivered: list[bytes] = []

    def carry(from_i: bool, data: bytes) -> None:
        start = sent[from_i]
        sent[from_i] += len(data)
        if from_i == from_initiator and index is not None and start <= index < start + len(data):
            data = _flip(data, index - start, mask)
        target = responder if from_i else initiator
        delivered.extend(e.raw for e in target.receive_data(data) if isinstance(e, EnvelopeReceived))

    try:
        carry(True, initiator.data_to_send())
        carry(False, responder.data_to_send())
        carry(True, initiator.data_to_send())
        source = initiator if from_initiator else responder
        carry(from_initiator, b"".join(source.send_envelope(raw) for raw in raws))
    except RemoteProtocolError:
        pass  # the tampering was detected: what matters is what was delivered before
    except LocalProtocolError:
        assert not source.authenticated  # the sender never finished its handshake, or failed
    return delivered, sent[from_initiator]


@settings(deadline=None, max_examples=60)
@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=3),
    st.booleans(),
    st.data(),
    st.integers(1, 255),
)
def test_tampering_with_any_byte_never_yields_an_altered_envelope(
    payloads: list[bytes], from_initiator: bool, data: st.DataObject, mask: int
) -> None:
    """Flip any byte of either direction (header, handshake or data): what arrives is an untouched strict prefix."""
    sender = I_ID if from_initiator else R_ID
    raws = [encode_message(message(sender, p)) for p in payloads]
    clean, length = _tampered_run(raws, from_initiator, None, mask)
    assert clean == raws
    index = data.draw(st.integers(0, length - 1), label="index")
    delivered, _ = _tampered_run(raws, from_initiator, index, mask)
    assert len(delivered) < len(raws)
    assert delivered == raws[: len(delivered)]


def test_sending_before_authentication_is_a_local_error_that_does_not_break_the_handshake() -> None:
    """send_envelope before Authenticated refuses, and the handshake still completes afterwards."""
    initiator, responder = pair()
    with pytest.raises(LocalProtocolError, match="before the secure session is authenticated"):
        initiator.send_envelope(encode_message(message(I_ID)))
    responder.receive_data(initiator.data_to_send())
    assert initiator.receive_data(responder.data_to_send()) == [Authenticated(R_ID, bytes(R_KEY.verify_key))]


def test_send_envelope_returns_the_pending_handshake_bytes_first() -> None:
    """An initiator that sends before writing message 3 still produces a stream the responder reads in order."""
    initiator, responder = pair()
    responder.receive_data(initiator.data_to_send())
    initiator.receive_data(responder.data_to_send())
    ping = message(I_ID)
    assert responder.receive_data(initiator.send_envelope(encode_message(ping))) == [
        Authenticated(I_ID, bytes(I_KEY.verify_key)),
        EnvelopeReceived(ping, encode_message(ping)),
    ]


def test_sending_someone_elses_envelope_is_a_local_error_naming_the_sender() -> None:
    """Our session only carries envelopes whose sender is our node id (the peer would reject any other)."""
    initiator, _ = connected()
    with pytest.raises(LocalProtocolError, match=f"sender '{M_ID}'"):
        initiator.send_envelope(encode_message(message(M_ID)))
    with pytest.raises(LocalProtocolError, match="invalid envelope"):
        initiator.send_envelope(b"\x01garbage")
    assert initiator.authenticated


@pytest.mark.parametrize("bad", ["", "R" * 32, R_ID.upper(), R_ID[:-1], bytes(16)])
def test_expected_peer_must_be_a_node_id(bad: object) -> None:
    """expected_peer is a node id (32 lowercase hex characters); anything else is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="expected_peer"):
        Session.initiator(I_STATIC, I_KEY, expected_peer=bad)  # type: ignore[arg-type]


def test_bad_keys_are_config_errors() -> None:
    """A static key of the wrong size is refused when the session is built."""
    with pytest.raises(ConfigError, match="static"):
        Session.responder(b"short", R_KEY)


def test_several_envelopes_share_secure_frames_and_arrive_in_order() -> None:
    """send_envelopes: 50 small envelopes go in one Noise frame (one AEAD call), and arrive as 50 events in order."""
    initiator, responder = connected()
    raws = [encode_message(message(I_ID, b"m%d" % n)) for n in range(50)]
    data, refused = initiator.send_envelopes(raws)
    assert refused == {}
    assert len(data) == 2 + 16 + sum(4 + len(r) for r in raws)  # one frame: length, tag, the lot
    events = responder.receive_data(data)
    assert [e.raw for e in events if isinstance(e, EnvelopeReceived)] == raws
    assert initiator.counts["sent"] == 50


def test_an_envelope_not_ours_is_left_out_of_a_batch_and_named() -> None:
    """In a batch, an envelope with another sender or undecodable bytes is refused by index; the rest go."""
    initiator, responder = connected()
    good = encode_message(message(I_ID, b"ok"))
    data, refused = initiator.send_envelopes([good, encode_message(message(R_ID)), b"\x01junk"])
    assert set(refused) == {1, 2} and "sender" in refused[1] and "invalid" in refused[2]
    assert [e.raw for e in responder.receive_data(data) if isinstance(e, EnvelopeReceived)] == [good]
    with pytest.raises(LocalProtocolError, match="before the secure session is authenticated"):
        pair()[0].send_envelopes([good])
