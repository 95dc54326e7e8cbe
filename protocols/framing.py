"""Length-prefixed framing shared by the stream protocols, and the ``NEED_DATA`` sentinel.

A stream carries frames, each a big-endian length followed by that many bytes::

    +---------------+------------------------+
    | length (N B)  | body (length bytes)    |     N = 4 for envelopes and discovery,
    +---------------+------------------------+     N = 2 for the secure channel

:class:`LengthPrefixedReader` is the receive half: feed it bytes in any
chunking, pull whole frame bodies out. The rule that matters for a node facing
hostile peers: **a length is checked against the protocol's limit as soon as
its header bytes arrive**, before waiting for (or allocating room for) the
body, so a peer announcing a 4 GiB frame is refused after four bytes.

:class:`FramedConnection` is the sans-I/O skeleton the envelope and discovery
connections share (h11's shape): ``receive_data(bytes)``, ``next_event()``
returning an event or :data:`NEED_DATA`. After it has raised once it stays
failed: every later ``next_event()`` raises again, so a caller cannot resume
parsing a stream whose framing is already lost.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import Generic, TypeVar

from villagemesh.errors import ProtocolError, RemoteProtocolError

__all__ = ["NEED_DATA", "FramedConnection", "LengthPrefixedReader", "NeedData"]

E = TypeVar("E")


class NeedData(enum.Enum):
    """The type of :data:`NEED_DATA` (an enum, so type checkers can narrow on it)."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA
"""Returned by ``next_event()`` when the buffered bytes do not hold a whole event yet."""

_COMPACT_AT = 64 * 1024  # drop consumed bytes once this many have piled up at the front


class LengthPrefixedReader:
    """Splits a byte stream into frame bodies; refuses an oversized length on sight.

    Args:
        header: the length field's layout, ``struct.Struct(">I")`` or ``">H"``.
        max_length: the largest body accepted (inclusive).
        what: the protocol's name, for error messages.
    """

    def __init__(self, header: struct.Struct, max_length: int, what: str) -> None:
        self._header = header
        self.max_length = max_length
        """The largest body accepted; a protocol may tighten it between frames."""
        self._what = what
        self._buffer = bytearray()
        self._start = 0

    def receive_data(self, data: bytes) -> None:
        """Append received bytes (any chunking)."""
        self._buffer += data

    @property
    def pending(self) -> int:
        """How many received bytes are not yet part of a returned frame."""
        return len(self._buffer) - self._start

    def take(self, count: int) -> bytes | None:
        """The next ``count`` raw bytes (no length prefix), or None until they have arrived."""
        if self.pending < count:
            return None
        out = bytes(self._buffer[self._start : self._start + count])
        self._consume(count)
        return out

    def next_frame(self) -> bytes | None:
        """The next whole frame body, or None until it has arrived.

        Raises:
            RemoteProtocolError: the length field exceeds ``max_length``
                (checked as soon as the header is complete).
        """
        size = self._header.size
        if self.pending < size:
            return None
        (length,) = self._header.unpack_from(self._buffer, self._start)
        if length > self.max_length:
            raise RemoteProtocolError(
                f"{self._what} frame length {length} exceeds the limit of {self.max_length} bytes"
            )
        if self.pending < size + length:
            return None
        body_start = self._start + size
        body = bytes(self._buffer[body_start : body_start + length])
        self._consume(size + length)
        return body

    def _consume(self, count: int) -> None:
        self._start += count
        if self._start == len(self._buffer):
            self._buffer.clear()
            self._start = 0
        elif self._start >= _COMPACT_AT:
            del self._buffer[: self._start]
            self._start = 0


class FramedConnection(Generic[E]):
    """A sans-I/O receiver of length-prefixed frames, each decoded into one event.

    Args:
        header, max_length, what: as for :class:`LengthPrefixedReader`.
        decode: turns one frame body into one event; raises only
            :class:`RemoteProtocolError`. The first error is sticky.
    """

    def __init__(self, header: struct.Struct, max_length: int, what: str, decode: Callable[[bytes], E]) -> None:
        self._reader = LengthPrefixedReader(header, max_length, what)
        self._what = what
        self._decode = decode
        self._error: ProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the peer, in any chunking."""
        self._reader.receive_data(data)

    @property
    def pending(self) -> int:
        """Received bytes not yet returned as an event (non-zero at EOF means a truncated frame)."""
        return self._reader.pending

    def next_event(self) -> E | NeedData:
        """The next event, or :data:`NEED_DATA`.

        Raises:
            RemoteProtocolError: the peer broke the protocol (now or earlier).
        """
        if self._error is not None:
            raise RemoteProtocolError(f"{self._what} stream already failed: {self._error}")
        try:
            body = self._reader.next_frame()
            if body is None:
                return NEED_DATA
            return self._decode(body)
        except ProtocolError as exc:
            self._error = exc
            raise
