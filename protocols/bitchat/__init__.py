"""BitChat's BLE mesh wire format, sans-I/O: packets, announces, fragments, Noise sessions, envelope carriage.

Wire-compatible with the iOS and Android BitChat clients (checked against the
golden vectors of bitchat-android's ``ClientRewriteWireContractTest.kt``). See
each module's docstring for its layout and rules:

- :mod:`.packet`: the v1/v2 packet, flags, type codes, padding, compression, Ed25519 signatures;
- :mod:`.announce`: the announce TLVs and the Noise payload TLVs;
- :mod:`.fragment`: type 0x20 fragments and the bounded reassembler;
- :mod:`.session`: Noise XX sessions with BitChat's explicit-nonce framing and replay window;
- :mod:`.carriage`: villagemesh envelopes as signed type 0x56 packets.
"""

from .announce import (
    Announcement,
    NoisePayload,
    PrivateMessage,
    decode_announcement,
    decode_noise_payload,
    decode_private_message,
    encode_announcement,
    encode_noise_payload,
    encode_private_message,
)
from .carriage import unwrap, wrap
from .fragment import Fragment, Limits, Reassembler, decode_fragment, encode_fragment, fragment_packet
from .packet import (
    BROADCAST,
    DEFAULT_TTL,
    ID_BYTES,
    PADDED_TYPES,
    Flags,
    MessageType,
    Packet,
    decode,
    encode,
    frame,
    pad,
    peer_id,
    sign,
    signing_bytes,
    unpad,
    verify,
)
from .session import BitchatSession, ReplayWindow, SessionInput, SessionState

__all__ = [
    "BROADCAST",
    "DEFAULT_TTL",
    "ID_BYTES",
    "PADDED_TYPES",
    "Announcement",
    "BitchatSession",
    "Flags",
    "Fragment",
    "Limits",
    "MessageType",
    "NoisePayload",
    "Packet",
    "PrivateMessage",
    "Reassembler",
    "ReplayWindow",
    "SessionInput",
    "SessionState",
    "decode",
    "decode_announcement",
    "decode_fragment",
    "decode_noise_payload",
    "decode_private_message",
    "encode",
    "encode_announcement",
    "encode_fragment",
    "encode_noise_payload",
    "encode_private_message",
    "fragment_packet",
    "frame",
    "pad",
    "peer_id",
    "sign",
    "signing_bytes",
    "unpad",
    "unwrap",
    "verify",
    "wrap",
]
