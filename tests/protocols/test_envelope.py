"""The message envelope: validation, the binary codec and the stream framer."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from villagemesh.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from villagemesh.protocols import envelope
from villagemesh.protocols import strategies as vst
from villagemesh.protocols.envelope import (
    MAX_MESSAGE_BYTES,
    MAX_PAYLOAD_BYTES,
    NEED_DATA,
    PROTOCOL_VERSION,
    FrameDecoder,
    Message,
    Priority,
    UnifiedMessage,
    decode_message,
    encode_message,
    frame_message,
)


def make(**changes: object) -> Message:
    fields: dict[str, object] = {
        "id": bytes(range(16)),
        "kind": "DATA",
        "sender": "a" * 32,
        "recipient": "b" * 32,
        "priority": Priority.NORMAL,
        "created_at": 1_700_000_000.5,
        "ttl": 86_400.0,
        "correlation_id": None,
        "payload": b"hello",
    }
    fields.update(changes)
    return Message(**fields)  # type: ignore[arg-type]


def drain(decoder: FrameDecoder) -> list[Message]:
    events = []
    while (event := decoder.next_event()) is not NEED_DATA:
        assert isinstance(event, Message)
        events.append(event)
    return events


@given(vst.messages())
def test_every_message_round_trips_through_the_codec(message: Message) -> None:
    """decode(encode(m)) == m, and the encoding respects the hard size limit. The careful reading
    (which names what is wrong, for input the one-pass reading finds off) agrees on it too."""
    data = encode_message(message)
    decoded = decode_message(data)
    assert decoded == message == envelope._decode_checked(data)
    assert type(decoded) is Message and vars(decoded) == vars(message) and hash(decoded) == hash(message)
    assert len(data) <= MAX_MESSAGE_BYTES
    assert data[0] == PROTOCOL_VERSION


@given(st.binary(max_size=400))
def test_random_bytes_decode_or_raise_remote_protocol_error(data: bytes) -> None:
    """Garbage never escapes as anything but RemoteProtocolError."""
    try:
        decode_message(data)
    except RemoteProtocolError:
        pass


@given(vst.messages(), st.data())
def test_mutated_encodings_decode_or_raise_remote_protocol_error(message: Message, data: st.DataObject) -> None:
    """Flipping a byte of a valid encoding, or cutting it, gives a message or RemoteProtocolError."""
    raw = bytearray(encode_message(message))
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        try:
            decode_message(candidate)
        except RemoteProtocolError:
            pass


@given(st.lists(vst.messages(max_payload=200), max_size=5), st.data())
def test_any_chunking_of_a_framed_stream_gives_the_same_messages(messages: list[Message], data: st.DataObject) -> None:
    """A FrameDecoder returns the same messages however the stream is split."""
    stream = b"".join(frame_message(m) for m in messages)
    decoder = FrameDecoder()
    received: list[Message] = []
    for chunk in data.draw(vst.chunkings(stream)):
        decoder.receive_data(chunk)
        received.extend(drain(decoder))
    assert received == messages
    assert decoder.pending == 0


@given(st.binary(max_size=300), st.data())
def test_random_streams_raise_only_remote_protocol_errors_and_stay_failed(raw: bytes, data: st.DataObject) -> None:
    """Arbitrary stream bytes give messages or a RemoteProtocolError, after which the decoder stays failed."""
    decoder = FrameDecoder()
    try:
        for chunk in data.draw(vst.chunkings(raw)):
            decoder.receive_data(chunk)
            drain(decoder)
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError, match="already failed"):
            decoder.next_event()


def test_oversized_frame_is_rejected_before_allocation() -> None:
    """A length prefix over the limit fails after four bytes, without waiting for the body."""
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">I", MAX_MESSAGE_BYTES + 1))
    with pytest.raises(RemoteProtocolError, match=str(MAX_MESSAGE_BYTES + 1)):
        decoder.next_event()


def test_a_frame_at_the_limit_is_accepted_as_a_length() -> None:
    """The limit is inclusive: the decoder waits for the body of a maximal frame."""
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">I", MAX_MESSAGE_BYTES))
    assert decoder.next_event() is NEED_DATA


def test_largest_payload_fits_under_the_hard_limit() -> None:
    """A message with maximal names and payload encodes within MAX_MESSAGE_BYTES."""
    big = make(
        kind="k" * 255,
        sender="s" * 255,
        recipient="r" * 255,
        correlation_id=bytes(16),
        payload=bytes(MAX_PAYLOAD_BYTES),
    )
    assert len(encode_message(big)) == MAX_MESSAGE_BYTES
    assert decode_message(encode_message(big)) == big


def test_oversized_input_is_rejected_before_parsing() -> None:
    """decode_message refuses input longer than the hard limit outright."""
    with pytest.raises(RemoteProtocolError, match="exceeds MAX_MESSAGE_BYTES"):
        decode_message(bytes(MAX_MESSAGE_BYTES + 1))


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"id": b"short"}, "id"),
        ({"correlation_id": b"x" * 17}, "correlation_id"),
        ({"kind": ""}, "kind"),
        ({"sender": 5}, "sender"),
        ({"recipient": "r" * 256}, "recipient"),
        ({"kind": "\udc80"}, "kind"),
        ({"priority": 2}, "priority"),
        ({"created_at": float("nan")}, "created_at"),
        ({"created_at": True}, "created_at"),
        ({"ttl": 0.0}, "ttl"),
        ({"ttl": float("inf")}, "ttl"),
        ({"payload": "text"}, "payload"),
        ({"payload": bytes(MAX_PAYLOAD_BYTES + 1)}, "payload"),
        ({"version": 2}, "version"),
        ({"version": True}, "version"),
    ],
)
def test_invalid_fields_raise_local_protocol_error_naming_the_field(changes: dict[str, object], named: str) -> None:
    """Building a bad Message is our mistake, and the error says which field."""
    with pytest.raises(LocalProtocolError, match=named):
        make(**changes)


def test_names_found_valid_are_remembered_within_a_bound_and_a_bad_one_never_is() -> None:
    """The check of kinds and node ids is skipped for a name seen valid; the memory is bounded."""
    envelope._GOOD_NAMES.clear()
    for i in range(envelope._GOOD_NAMES_MAX + 10):
        make(kind=f"K{i}")
    assert 0 < len(envelope._GOOD_NAMES) <= envelope._GOOD_NAMES_MAX
    with pytest.raises(LocalProtocolError, match="kind"):
        make(kind=["DATA"])  # unhashable: still a LocalProtocolError, not a TypeError
    with pytest.raises(LocalProtocolError, match="recipient"):
        make(recipient="r" * 256)
    assert "r" * 256 not in envelope._GOOD_NAMES


@given(vst.messages(), vst.messages())
def test_a_sibling_is_the_template_with_the_others_id_recipient_and_payload(template: Message, other: Message) -> None:
    """sibling() is dataclasses.replace() for those three fields, whether or not the quick checks settle them."""
    made = envelope.sibling(template, other.id, other.recipient, other.payload)
    assert made == dataclasses.replace(template, id=other.id, recipient=other.recipient, payload=other.payload)
    assert type(made) is Message and hash(made) == hash(dataclasses.replace(made))


@pytest.mark.parametrize(
    ("id_", "recipient", "payload", "named"),
    [
        (b"short", "bob", b"", "id"),
        (bytes(16), "", b"", "recipient"),
        (bytes(16), "bob", "not bytes", "payload"),
        (bytes(16), "bob", bytes(MAX_PAYLOAD_BYTES + 1), "payload"),
    ],
)
def test_a_sibling_with_a_bad_field_raises_naming_it(
    id_: object, recipient: object, payload: object, named: str
) -> None:
    with pytest.raises(LocalProtocolError, match=named):
        envelope.sibling(make(), id_, recipient, payload)  # type: ignore[arg-type]


def _payload_over_the_limit() -> bytes:
    """A well-formed encoding, under MAX_MESSAGE_BYTES, whose payload is one byte over MAX_PAYLOAD_BYTES."""
    raw = encode_message(make(payload=b"x" * MAX_PAYLOAD_BYTES))
    at = len(raw) - MAX_PAYLOAD_BYTES - 4
    return raw[:at] + struct.pack(">I", MAX_PAYLOAD_BYTES + 1) + raw[at + 4 :] + b"x"


def _encoded_with(**patch: int) -> bytearray:
    raw = bytearray(encode_message(make()))
    for offset, value in patch.items():
        raw[int(offset.lstrip("o"))] = value
    return raw


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "truncated"),
        (_encoded_with(o0=2), "version 2"),
        (_encoded_with(o17=9), "priority 9"),
        (_encoded_with(o18=0x80), "flag"),
        (bytes(encode_message(make())) + b"\x00", "trailing"),
        (bytes(encode_message(make(kind="é")).replace("é".encode(), b"\xff\xfe")), "not UTF-8"),
        (bytes(encode_message(make(ttl=1.0)).replace(struct.pack(">d", 1.0), struct.pack(">d", -1.0))), "ttl"),
        (bytes(encode_message(make(kind="X")).replace(b"\x01X", b"\x00")), "kind"),
        (bytes(encode_message(make(sender="S" * 7)).replace(b"\x07" + b"S" * 7, b"\x00")), "sender"),
        (bytes(encode_message(make(recipient="R" * 7)).replace(b"\x07" + b"R" * 7, b"\x00")), "recipient"),
        (
            bytes(
                encode_message(make(created_at=1.5)).replace(struct.pack(">d", 1.5), struct.pack(">d", float("nan")))
            ),
            "created_at",
        ),
        (_payload_over_the_limit(), "MAX_PAYLOAD_BYTES"),
    ],
)
def test_bad_encodings_raise_remote_protocol_error_with_the_reason(raw: bytes, reason: str) -> None:
    """Each way an encoding can be wrong is the peer's fault and is named."""
    with pytest.raises(RemoteProtocolError, match=reason):
        decode_message(bytes(raw))


def test_expiry_is_created_at_plus_ttl() -> None:
    """expires_at and is_expired follow the caller's clock."""
    message = make(created_at=100.0, ttl=5.0)
    assert message.expires_at == 105.0
    assert not message.is_expired(104.9)
    assert message.is_expired(105.0)


def test_broadcast_has_no_recipient_and_round_trips() -> None:
    """recipient=None means broadcast, and survives the wire."""
    message = make(recipient=None, correlation_id=bytes(16), priority=Priority.BULK)
    assert message.is_broadcast and not make().is_broadcast
    assert decode_message(encode_message(message)) == message


def test_unified_message_is_the_same_class() -> None:
    """UnifiedMessage is the legacy name of Message."""
    assert UnifiedMessage is Message


def test_priorities_order_critical_first() -> None:
    """Priority values sort CRITICAL before BULK."""
    assert sorted(Priority, reverse=True)[-1] is Priority.CRITICAL
    assert [p.value for p in Priority] == [0, 1, 2, 3, 4]


def test_messages_are_immutable() -> None:
    """A Message is a frozen value."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        make().kind = "other"  # type: ignore[misc]


def test_protocol_error_is_abstract() -> None:
    """Only the Local/Remote subclasses can be raised (blame is always assigned)."""
    with pytest.raises(TypeError):
        ProtocolError("x")
