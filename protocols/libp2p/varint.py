"""Unsigned varints (multiformats' ``uvarint``) and frames prefixed by one, sans-I/O.

``uvarint``: 7 bits a byte, least significant group first, the high bit set on every
byte but the last; at most :data:`MAX_VARINT_BYTES` bytes (63 bits), and minimal (no
trailing 0x80 … 0x00 groups), as the multiformats spec requires.

:class:`UvarintFramer` turns a byte stream into the frames ``uvarint(len) ‖ bytes`` it
carries (multistream-select, identify, Kademlia all use them), refusing a frame above
its limit as soon as the prefix says so, before any of its bytes are kept.
"""

from __future__ import annotations

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

from ..framing import NEED_DATA, NeedData

__all__ = ["MAX_VARINT_BYTES", "UvarintFramer", "decode_uvarint", "encode_uvarint", "frame"]

MAX_VARINT_BYTES = 9
"""The multiformats limit: 63 bits of value."""


def encode_uvarint(value: int) -> bytes:
    """``value`` (0 … 2^63 − 1) as a uvarint."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 63:
        raise LocalProtocolError(f"a uvarint is an int in 0 … 2^63 - 1, got {value!r}")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def decode_uvarint(data: bytes, offset: int = 0) -> tuple[int, int] | NeedData:
    """``(value, offset after it)``, or :data:`NEED_DATA` when ``data`` ends inside it.

    Raises :class:`RemoteProtocolError` for a varint longer than 9 bytes or not minimal.
    """
    value = shift = 0
    for i in range(offset, min(len(data), offset + MAX_VARINT_BYTES)):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > offset:
                raise RemoteProtocolError(f"uvarint at {offset} is not minimal: {data[offset : i + 1].hex()}")
            return value, i + 1
        shift += 7
    if len(data) - offset >= MAX_VARINT_BYTES:
        raise RemoteProtocolError(f"uvarint at {offset} is longer than {MAX_VARINT_BYTES} bytes")
    return NEED_DATA


class UvarintFramer:
    """Frames of ``uvarint(len) ‖ bytes`` out of a stream, each at most ``max_frame`` bytes."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    def next_frame(self) -> bytes | NeedData:
        """The next whole frame, or :data:`NEED_DATA`; :class:`RemoteProtocolError` for one above the limit."""
        head = decode_uvarint(bytes(self._buffer[:MAX_VARINT_BYTES]))
        if head is NEED_DATA:
            return NEED_DATA
        size, start = head
        if size > self.max_frame:
            raise RemoteProtocolError(f"a frame of {size} bytes is above the {self.max_frame} allowed")
        if len(self._buffer) < start + size:
            return NEED_DATA
        frame = bytes(self._buffer[start : start + size])
        del self._buffer[: start + size]
        return frame

    def rest(self) -> bytes:
        """The bytes received after the last frame taken (handed on whole when a protocol switch follows)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


def frame(payload: bytes) -> bytes:
    """``uvarint(len(payload)) ‖ payload``."""
    return encode_uvarint(len(payload)) + payload
