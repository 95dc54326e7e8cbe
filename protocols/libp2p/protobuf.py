"""The few protobuf wire rules libp2p's messages need: varint (type 0) and length-delimited (type 2) fields.

A field is ``uvarint(number << 3 | wire type)`` then its value: a uvarint for type 0,
``uvarint(len) ‖ bytes`` for type 2. Fields may repeat (the parser keeps every value in
order) and unknown fields are kept too (a reader ignores what it does not know, as
protobuf does); any other wire type, a cut value or field number 0 is a
:class:`RemoteProtocolError`. At most :data:`MAX_MESSAGE` bytes are parsed.
"""

from __future__ import annotations

from villagemesh.errors import RemoteProtocolError

from ..framing import NEED_DATA
from .varint import decode_uvarint, encode_uvarint

__all__ = ["MAX_MESSAGE", "encode_bytes_field", "encode_varint_field", "parse_fields"]

MAX_MESSAGE = 1 << 20
"""Identify and Kademlia messages are kilobytes; a megabyte bounds a hostile one."""


def encode_bytes_field(number: int, value: bytes) -> bytes:
    return encode_uvarint(number << 3 | 2) + encode_uvarint(len(value)) + value


def encode_varint_field(number: int, value: int) -> bytes:
    return encode_uvarint(number << 3) + encode_uvarint(value)


def parse_fields(data: bytes) -> dict[int, list[int | bytes]]:
    """``{field number: [values in order]}``: ints for varint fields, bytes for length-delimited ones."""
    if len(data) > MAX_MESSAGE:
        raise RemoteProtocolError(f"protobuf: {len(data)} bytes is more than the {MAX_MESSAGE} parsed")
    data = bytes(data)  # a bytearray or memoryview in, bytes values out
    fields: dict[int, list[int | bytes]] = {}
    at = 0
    while at < len(data):
        tag, at = _varint(data, at, "a field key")
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise RemoteProtocolError("protobuf: field number 0")
        if wire == 0:
            value, at = _varint(data, at, f"field {number}")
            fields.setdefault(number, []).append(value)
        elif wire == 2:
            size, at = _varint(data, at, f"the length of field {number}")
            if at + size > len(data):
                raise RemoteProtocolError(f"protobuf: field {number} claims {size} bytes, {len(data) - at} are left")
            fields.setdefault(number, []).append(data[at : at + size])
            at += size
        else:
            raise RemoteProtocolError(f"protobuf: wire type {wire} of field {number} is not varint or bytes")
    return fields


def _varint(data: bytes, at: int, what: str) -> tuple[int, int]:
    found = decode_uvarint(data, at)
    if found is NEED_DATA:
        raise RemoteProtocolError(f"protobuf: cut inside {what}")
    return found
