"""Large transfers, sans-I/O: the wire messages (:mod:`.wire`) and the two ends' state machines (:mod:`.machine`).

A file is offered (size, kind, name, digest of the whole by the algorithm the
offer names, chunk size), accepted with a resume point or refused with a typed
reason, sent as chunks (each with its own CRC-32 check) within a window of
unacknowledged chunks, acknowledged as the receiver commits them, and completed
once the receiver has verified the whole. See the two modules' docstrings for the layout and rules.
"""

from .machine import (
    RECEIVER_TABLE,
    SENDER_TABLE,
    ChunkVerdict,
    Limits,
    Receiver,
    ReceiverState,
    Sender,
    SenderState,
    judge,
)
from .wire import (
    CHUNK_KIND,
    DIGEST_BYTES,
    MAX_CHUNK_BYTES,
    MAX_TEXT_BYTES,
    MAX_TRANSFER_BYTES,
    MIN_CHUNK_BYTES,
    TRANSFER_ID_BYTES,
    TRANSFER_KIND,
    Accept,
    Chunk,
    ChunkAck,
    Complete,
    DigestAlgorithm,
    Failed,
    FailReason,
    Offer,
    Refuse,
    RefuseReason,
    WireMessage,
    chunk_check,
    chunk_count,
    decode,
    encode,
    whole_digest,
)

__all__ = [
    "CHUNK_KIND",
    "DIGEST_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_TEXT_BYTES",
    "MAX_TRANSFER_BYTES",
    "MIN_CHUNK_BYTES",
    "RECEIVER_TABLE",
    "SENDER_TABLE",
    "TRANSFER_ID_BYTES",
    "TRANSFER_KIND",
    "Accept",
    "Chunk",
    "ChunkAck",
    "ChunkVerdict",
    "Complete",
    "DigestAlgorithm",
    "FailReason",
    "Failed",
    "Limits",
    "Offer",
    "Receiver",
    "ReceiverState",
    "Refuse",
    "RefuseReason",
    "Sender",
    "SenderState",
    "WireMessage",
    "chunk_check",
    "chunk_count",
    "decode",
    "encode",
    "judge",
    "whole_digest",
]
