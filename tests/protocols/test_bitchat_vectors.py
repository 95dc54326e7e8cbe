"""protocols.bitchat against BitChat's published golden bytes.

Every expected byte string below is copied literally from bitchat-android's
``app/src/test/kotlin/com/bitchat/android/contracts/ClientRewriteWireContractTest.kt``
(permissionlesstech/bitchat-android @ 09b481f1, 2026-08-17); the test name in
each comment is the Kotlin test it comes from.
"""

from __future__ import annotations

import pytest

from villagemesh.errors import RemoteProtocolError
from villagemesh.protocols.bitchat import (
    Announcement,
    Fragment,
    MessageType,
    NoisePayload,
    Packet,
    PrivateMessage,
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
)
from villagemesh.protocols.bitchat.fragment import FRAGMENT_HEADER_BYTES

h = bytes.fromhex


def test_v1_packet_matches_canonical_unpadded_bytes() -> None:
    # `v1 packet matches canonical unpadded bytes`
    packet = Packet(
        type=MessageType.MESSAGE,
        sender_id=h("1011121314151617"),
        timestamp=0x0102030405060708,
        payload=h("aabbcc"),
        ttl=7,
    )
    wire = h("01020701020304050607080000031011121314151617aabbcc")
    assert encode(packet) == wire
    assert decode(wire) == packet


def test_v2_routed_signed_packet_matches_canonical_section_order() -> None:
    # `v2 routed signed packet matches canonical section order`
    signature = b"\x5a" * 64
    packet = Packet(
        type=MessageType.NOISE_ENCRYPTED,
        sender_id=h("0102030405060708"),
        recipient_id=h("1112131415161718"),
        timestamp=42,
        payload=h("dead"),
        signature=signature,
        ttl=5,
        version=2,
        route=(h("2122232425262728"), h("3132333435363738")),
    )
    wire = (
        h("021105000000000000002a0b00000002010203040506070811121314151617180221222324252627283132333435363738dead")
        + signature
    )
    assert encode(packet) == wire
    assert decode(wire) == packet


def test_private_message_and_noise_envelopes_match_deployed_type_bytes() -> None:
    # `private message and Noise envelopes match deployed type bytes`
    private = h("00026d3101026869")
    assert encode_private_message(PrivateMessage("m1", "hi")) == private
    assert decode_private_message(private) == PrivateMessage("m1", "hi")
    assert encode_noise_payload(NoisePayload(0x01, private)) == h("0100026d3101026869")
    assert decode_noise_payload(h("09cafe")).type == 0x20
    assert encode_noise_payload(decode_noise_payload(h("09cafe"))) == h("20cafe")


def test_fragment_payload_matches_the_thirteen_byte_ios_header() -> None:
    # `fragment payload matches the thirteen byte iOS header`
    fragment = Fragment(h("0001020304050607"), 1, 3, MessageType.MESSAGE, h("aabb"))
    wire = h("00010203040506070001000302aabb")
    assert encode_fragment(fragment) == wire
    assert decode_fragment(wire) == fragment


def test_identity_announcement_matches_canonical_tlv_order_and_preserves_extensions() -> None:
    # `identity announcement matches canonical TLV order and preserves extensions`
    # (PeerCapabilities.PRIVATE_MEDIA encodes as the two bytes 00 01; kept here as opaque bytes)
    announcement = Announcement(
        nickname="bob",
        noise_public_key=b"\x11" * 32,
        signing_public_key=b"\x22" * 32,
        capabilities=h("0001"),
        extensions=((0x7F, h("cafe")),),
    )
    wire = h("0103626f620220") + b"\x11" * 32 + h("0320") + b"\x22" * 32 + h("050200017f02cafe")
    assert encode_announcement(announcement) == wire
    assert decode_announcement(wire) == announcement


@pytest.mark.parametrize(
    "decoder, wire",
    [
        # `TLV decoders reject missing required fields and truncated values`
        (decode_private_message, h("00026d31")),
        (decode_private_message, h("00026d3101036869")),
        (decode_announcement, h("0103626f62022011")),
        (decode_fragment, bytes(FRAGMENT_HEADER_BYTES - 1)),
    ],
)
def test_tlv_decoders_reject_missing_required_fields_and_truncated_values(decoder, wire) -> None:
    with pytest.raises(RemoteProtocolError):
        decoder(wire)


def test_every_truncation_of_a_golden_packet_is_refused() -> None:
    wire = h("01020701020304050607080000031011121314151617aabbcc")
    for length in range(len(wire)):
        with pytest.raises(RemoteProtocolError):
            decode(wire[:length])
