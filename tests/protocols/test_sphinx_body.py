"""BetaNet bodies: signed messages with their SURB, replies, loop and drop cover; nothing else gets through."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from villagemesh.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from villagemesh.protocols.discovery import node_id_from_public_key
from villagemesh.protocols.sphinx import HEADER_BYTES, Surb
from villagemesh.protocols.sphinx.body import (
    LOOP_ID_BYTES,
    MAX_MESSAGE_ENVELOPE,
    MAX_REPLY_ENVELOPE,
    MAX_TWO_SURB_ENVELOPE,
    SURB_BYTES,
    BodyKind,
    Drop,
    Loop,
    Signed,
    decode_body,
    decode_surb,
    encode_drop,
    encode_loop,
    encode_message,
    encode_reply,
    encode_surb,
)
from villagemesh.protocols.sphinx.packet import MAX_MESSAGE

ALICE = SigningKey(b"a" * 32)
BOB_ID = node_id_from_public_key(bytes(SigningKey(b"b" * 32).verify_key))
ALICE_ID = node_id_from_public_key(bytes(ALICE.verify_key))


def surb() -> Surb:
    return Surb(os.urandom(16), os.urandom(HEADER_BYTES), os.urandom(128))


@given(st.binary(max_size=MAX_MESSAGE_ENVELOPE))
def test_a_message_round_trips_with_its_signer_and_surb(envelope: bytes) -> None:
    s = surb()
    body = encode_message(ALICE, BOB_ID, envelope, s)
    assert len(body) <= MAX_MESSAGE
    assert decode_body(body, BOB_ID) == Signed(BodyKind.MESSAGE, ALICE_ID, envelope, (s,))


@given(st.binary(max_size=MAX_TWO_SURB_ENVELOPE))
def test_a_small_message_carries_two_surbs(envelope: bytes) -> None:
    s1, s2 = surb(), surb()
    body = encode_message(ALICE, BOB_ID, envelope, s1, s2)
    assert len(body) <= MAX_MESSAGE
    assert decode_body(body, BOB_ID) == Signed(BodyKind.MESSAGE, ALICE_ID, envelope, (s1, s2))


@given(st.binary(max_size=MAX_REPLY_ENVELOPE))
def test_a_reply_round_trips_with_its_signer(envelope: bytes) -> None:
    expected = Signed(BodyKind.REPLY, ALICE_ID, envelope, ())
    assert decode_body(encode_reply(ALICE, BOB_ID, envelope), BOB_ID) == expected


@given(st.binary(max_size=MAX_MESSAGE_ENVELOPE))
def test_a_reply_may_carry_a_surb_back_for_its_own_ack(envelope: bytes) -> None:
    s = surb()
    expected = Signed(BodyKind.REPLY, ALICE_ID, envelope, (s,))
    assert decode_body(encode_reply(ALICE, BOB_ID, envelope, s), BOB_ID) == expected


def test_cover_bodies_round_trip() -> None:
    loop_id = os.urandom(LOOP_ID_BYTES)
    assert decode_body(encode_loop(loop_id), BOB_ID) == Loop(loop_id)
    assert decode_body(encode_drop(os.urandom(100)), BOB_ID) == Drop()


def test_a_body_signed_for_another_recipient_or_changed_is_refused() -> None:
    body = encode_message(ALICE, BOB_ID, b"envelope", surb())
    with pytest.raises(RemoteProtocolError, match="signature"):
        decode_body(body, ALICE_ID)
    swapped = body[: -len(b"envelope") - SURB_BYTES] + encode_surb(surb()) + b"envelope"
    with pytest.raises(RemoteProtocolError, match="signature"):
        decode_body(swapped, BOB_ID)
    with pytest.raises(RemoteProtocolError, match="signature"):
        decode_body(body[:-1] + b"X", BOB_ID)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "empty"),
        (bytes([BodyKind.LOOP]) + bytes(3), "loop body"),
        (bytes([9]) + bytes(200), "unknown body kind 9"),
        (bytes([BodyKind.REPLY]) + bytes(10), "at least"),
        (bytes([BodyKind.MESSAGE]) + bytes(96) + (5).to_bytes(2, "big") + bytes(SURB_BYTES), "SURB length"),
        (bytes([BodyKind.MESSAGE]) + bytes(96), "SURB length"),
        (bytes([BodyKind.MESSAGE]) + bytes(96) + (0).to_bytes(2, "big"), "SURB length"),
        (bytes([BodyKind.REPLY]) + bytes(96) + (SURB_BYTES).to_bytes(2, "big") + bytes(10), "SURB length"),
    ],
)
def test_malformed_bodies_are_refused_naming_what_is_wrong(body: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_body(body, BOB_ID)


@settings(max_examples=300)
@given(st.binary(max_size=MAX_MESSAGE))
def test_random_bodies_only_ever_raise_a_protocol_error(body: bytes) -> None:
    try:
        decode_body(body, BOB_ID)
    except ProtocolError:
        pass


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: encode_message(ALICE, BOB_ID, bytes(MAX_MESSAGE_ENVELOPE + 1), surb()), "at most 1437"),
        (lambda: encode_message(ALICE, BOB_ID, bytes(MAX_TWO_SURB_ENVELOPE + 1), surb(), surb()), "at most 959"),
        (lambda: encode_message(ALICE, BOB_ID, b"", surb(), surb(), surb()), "1 or 2 SURBs"),
        (lambda: encode_message(ALICE, BOB_ID, b""), "1 or 2 SURBs"),
        (lambda: encode_reply(ALICE, BOB_ID, bytes(MAX_REPLY_ENVELOPE + 1)), "at most 1915"),
        (lambda: encode_reply(ALICE, BOB_ID, bytes(MAX_MESSAGE_ENVELOPE + 1), surb()), "at most 1437"),
        (lambda: encode_reply(ALICE, "not hex", b""), "node id \\(hex\\)"),
        (lambda: encode_reply(ALICE, "abcd", b""), "16-byte node id"),
        (lambda: encode_loop(b"short"), "loop id"),
        (lambda: encode_surb(Surb(b"x", b"", b"")), "SURB is"),
    ],
)
def test_a_sender_breaking_the_limits_gets_a_local_protocol_error(call: object, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        call()  # type: ignore[operator]


def test_a_surb_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match=f"SURB is {SURB_BYTES}"):
        decode_surb(b"short")
