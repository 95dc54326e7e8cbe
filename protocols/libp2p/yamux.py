"""yamux (``/yamux/1.0.0``): many streams over one connection, with per-stream flow control; sans-I/O.

Every frame is a 12-byte header, then ``length`` bytes of data for DATA frames::

    version(1) = 0 ‖ type(1) ‖ flags(2, big-endian) ‖ stream id(4) ‖ length(4)
    type:  DATA 0 (length = data bytes), WINDOW_UPDATE 1 (length = credit),
           PING 2 (length = opaque value; stream 0), GO_AWAY 3 (length = error code; stream 0)
    flags: SYN 1 (opens a stream), ACK 2 (accepts one / answers a ping), FIN 4 (half-close), RST 8 (abort)

The dialer (client) opens odd stream ids, the listener even ones. Each stream starts
with :data:`INITIAL_WINDOW` bytes of credit each way; a receiver grants more with a
WINDOW_UPDATE as its application consumes data (:meth:`Session.consumed`); a sender never
sends past its credit (what does not fit waits in :meth:`Session.send`'s queue until
credit comes). A ping is answered at once with the same opaque value.

Stream states (per stream, a table below; anything else is a :class:`RemoteProtocolError`
for the peer's frames, :class:`LocalProtocolError` for ours; frames still in flight for
a stream that is gone are discarded and counted, a frame for one that never existed is
an error)::

    OPEN       both ways open            ─ FIN in ─▶ REMOTE_CLOSED ─ FIN out ─▶ CLOSED
                                         ─ FIN out ─▶ LOCAL_CLOSED ─ FIN in ─▶ CLOSED
    any        ─ RST either way ─▶ RESET (gone)

Limits, each with its reason: :data:`MAX_STREAMS` open at once (a peer opening
streams without end is refused with RST), :data:`INITIAL_WINDOW` (the spec's 256 KiB;
``Session(window=…)`` grants up to :data:`MAX_WINDOW` per stream, the extra credit sent
with the stream's SYN or ACK: one window per round trip bounds a stream's throughput),
data beyond the credit granted is a protocol error (a peer ignoring flow control).
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass, field

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "HEADER_BYTES",
    "INITIAL_WINDOW",
    "MAX_FRAME_DATA",
    "MAX_STREAMS",
    "MAX_WINDOW",
    "Data",
    "Flag",
    "GoAway",
    "Pong",
    "Session",
    "StreamClosed",
    "StreamOpened",
    "StreamRefused",
    "StreamReset",
    "Type",
    "encode_frame",
]

HEADER_BYTES = 12
INITIAL_WINDOW = 256 * 1024
MAX_WINDOW = 16 * 1024 * 1024
"""The largest receive window a session may grant per stream (py-libp2p grows to 16 MiB too)."""
MAX_STREAMS = 256
MAX_FRAME_DATA = 65519 - 12
"""Data bytes per DATA frame by default: a frame with its header then fits one Noise transport
message (65,519 bytes of plaintext), so the peer reads each frame where it was decrypted."""
_HEADER = struct.Struct(">BBHII")


class Type(enum.IntEnum):
    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3


class Flag(enum.IntFlag):
    NONE = 0
    SYN = 1
    ACK = 2
    FIN = 4
    RST = 8


_TYPES = tuple(Type)
"""Frame types by their number (an index is cheaper than ``Type(n)``)."""
_SYN, _ACK, _FIN, _RST = int(Flag.SYN), int(Flag.ACK), int(Flag.FIN), int(Flag.RST)


def encode_frame(kind: Type, flags: Flag, stream: int, length: int, data: bytes = b"") -> bytes:
    return _HEADER.pack(0, kind, flags, stream, length) + data


@dataclass(frozen=True, slots=True)
class StreamOpened:
    stream: int


@dataclass(frozen=True, slots=True)
class Data:
    """Data on ``stream``: a view of the bytes given to :meth:`Session.receive_data` (not a copy)."""

    stream: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """The peer half-closed ``stream`` (FIN): it sends no more."""

    stream: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream: int


@dataclass(frozen=True, slots=True)
class StreamRefused:
    """The peer opened ``stream`` and we reset it at once: too many open, or the session is going away."""

    stream: int


@dataclass(frozen=True, slots=True)
class Pong:
    opaque: int


@dataclass(frozen=True, slots=True)
class GoAway:
    code: int


Event = StreamOpened | Data | StreamClosed | StreamReset | StreamRefused | Pong | GoAway


class _State(enum.Enum):
    OPEN = "open"
    LOCAL_CLOSED = "closed by us"
    REMOTE_CLOSED = "closed by the peer"

    # Members are singletons, so identity hashes them: Enum's own __hash__ (of the name, in Python)
    # costs a call per table lookup, two lookups per frame.
    __hash__ = object.__hash__


class _Step(enum.Enum):
    FIN_IN = "FIN from the peer"
    FIN_OUT = "our FIN"
    DATA_IN = "data from the peer"
    DATA_OUT = "our data"

    __hash__ = object.__hash__


_CLOSED = None
"""The state after both FINs: the stream is forgotten."""

_STEPS: dict[tuple[_State, _Step], _State | None] = {
    (_State.OPEN, _Step.FIN_IN): _State.REMOTE_CLOSED,
    (_State.OPEN, _Step.FIN_OUT): _State.LOCAL_CLOSED,
    (_State.OPEN, _Step.DATA_IN): _State.OPEN,
    (_State.OPEN, _Step.DATA_OUT): _State.OPEN,
    (_State.REMOTE_CLOSED, _Step.FIN_OUT): _CLOSED,
    (_State.REMOTE_CLOSED, _Step.DATA_OUT): _State.REMOTE_CLOSED,
    (_State.LOCAL_CLOSED, _Step.FIN_IN): _CLOSED,
    (_State.LOCAL_CLOSED, _Step.DATA_IN): _State.LOCAL_CLOSED,
}


@dataclass
class _Stream:
    state: _State
    send_window: int = INITIAL_WINDOW
    receive_window: int = INITIAL_WINDOW
    unacknowledged: int = 0
    """Bytes delivered to the application and not yet consumed."""
    queued: deque[memoryview] = field(default_factory=deque)
    queued_bytes: int = 0
    fin_queued: bool = False


class Session:
    """One side of a yamux session. ``client=True`` on the dialer's side."""

    def __init__(self, *, client: bool, window: int = INITIAL_WINDOW, frame_data: int = MAX_FRAME_DATA) -> None:
        if not INITIAL_WINDOW <= window <= MAX_WINDOW:
            raise LocalProtocolError(f"yamux: a receive window is {INITIAL_WINDOW} … {MAX_WINDOW} bytes, got {window}")
        if frame_data < 1:
            raise LocalProtocolError(f"yamux: a DATA frame carries at least 1 byte, got {frame_data}")
        self.client = client
        self.frame_data = frame_data
        """The most data bytes we put in one DATA frame."""
        self.window = window
        """Our receive window per stream: the spec's 256 KiB, and more granted with the SYN or ACK."""
        self._next_id = 1 if client else 2
        self._streams: dict[int, _Stream] = {}
        self._out: list[bytes] = []
        """Frames to send, each whole (header and data in one buffer)."""
        self._in = bytearray()
        self._going_away = False
        self._peer_highest = 0
        """The highest stream id the peer has opened (its ids must grow)."""
        self.discarded = 0
        """Data bytes that arrived for streams already gone, discarded."""

    # -- our side ---------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        return b"".join(self.frames_to_send())

    def frames_to_send(self) -> list[bytes]:
        """What :meth:`data_to_send` would give, frame by frame (a secure channel packs them as they are)."""
        out, self._out = self._out, []
        return out

    def open_stream(self) -> int:
        """A new stream's id (a WINDOW_UPDATE with SYN goes out)."""
        if self._going_away:
            raise LocalProtocolError("yamux: the session is going away: no new streams")
        if len(self._streams) >= MAX_STREAMS:
            raise LocalProtocolError(f"yamux: {MAX_STREAMS} streams are open already")
        stream, self._next_id = self._next_id, self._next_id + 2
        self._streams[stream] = _Stream(_State.OPEN, receive_window=self.window)
        self._out.append(encode_frame(Type.WINDOW_UPDATE, Flag.SYN, stream, self.window - INITIAL_WINDOW))
        return stream

    def send(self, stream: int, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` on ``stream``; it goes out as the peer's credit allows (bytes kept as they are, no copy)."""
        state = self._stream(stream, _Step.DATA_OUT)
        if not data:
            return
        state.queued.append(memoryview(data if type(data) is bytes else bytes(data)))
        state.queued_bytes += len(data)
        self._flush(stream, state)

    def close(self, stream: int) -> None:
        """Half-close ``stream`` (FIN, after whatever is queued on it)."""
        state = self._stream(stream, _Step.FIN_OUT)
        state.fin_queued = True
        self._flush(stream, state)

    def reset(self, stream: int) -> None:
        """Abort ``stream`` (RST); it is forgotten at once."""
        if stream not in self._streams:
            raise LocalProtocolError(f"yamux: stream {stream} is not open")
        del self._streams[stream]
        self._out.append(encode_frame(Type.WINDOW_UPDATE, Flag.RST, stream, 0))

    def consumed(self, stream: int, size: int) -> None:
        """The application took ``size`` bytes of ``stream``'s data: grant the peer that much credit again."""
        state = self._streams.get(stream)
        if state is None:
            return  # gone meanwhile (reset, or closed both ways): no credit to give
        if not 0 <= size <= state.unacknowledged:
            given = state.unacknowledged
            raise LocalProtocolError(f"yamux: {size} bytes consumed of stream {stream}, {given} were given")
        state.unacknowledged -= size
        state.receive_window += size
        self._out.append(encode_frame(Type.WINDOW_UPDATE, Flag.NONE, stream, size))

    def ping(self, opaque: int) -> None:
        self._out.append(encode_frame(Type.PING, Flag.SYN, 0, opaque & 0xFFFFFFFF))

    def go_away(self, code: int = 0) -> None:
        self._going_away = True
        self._out.append(encode_frame(Type.GO_AWAY, Flag.NONE, 0, code))

    def _stream(self, stream: int, step: _Step) -> _Stream:
        state = self._streams.get(stream)
        if state is None or state.fin_queued:
            raise LocalProtocolError(f"yamux: stream {stream} is not open for {step.value}")
        if (state.state, step) not in _STEPS:
            raise LocalProtocolError(f"yamux: {step.value} on stream {stream}, which is {state.state.value}")
        return state

    def _flush(self, stream: int, state: _Stream) -> None:
        queued = state.queued
        while queued and state.send_window > 0:
            # one frame of up to frame_data bytes, taken across the writes queued (the only copy made)
            size = left = min(state.send_window, self.frame_data, state.queued_bytes)
            parts: list[bytes | memoryview] = [_HEADER.pack(0, Type.DATA, Flag.NONE, stream, size)]
            while left:
                chunk = queued[0]
                if len(chunk) > left:
                    parts.append(chunk[:left])
                    queued[0] = chunk[left:]
                    break
                parts.append(queued.popleft())
                left -= len(chunk)
            state.send_window -= size
            state.queued_bytes -= size
            self._out.append(b"".join(parts))
        if state.fin_queued and not queued:
            self._out.append(encode_frame(Type.WINDOW_UPDATE, Flag.FIN, stream, 0))
            state.fin_queued = False
            self._advance(stream, state, _Step.FIN_OUT)

    def _advance(self, stream: int, state: _Stream, step: _Step) -> None:
        after = _STEPS[(state.state, step)]
        if after is _CLOSED:
            del self._streams[stream]
        else:
            state.state = after

    # -- the peer's side ---------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the peer; the events of every whole frame in them, in order.

        Zero-copy: a :class:`Data` event's data is a view of ``data`` (or of the session's own
        buffer, for a frame that came in pieces), so ``data`` must not change afterwards;
        only an incomplete frame at the end is copied, to wait for the rest.
        """
        if self._in:
            self._in += data
            data, self._in = self._in, bytearray()  # never changed again: views of it stay true
        view = memoryview(data)
        events: list[Event] = []
        at, end = 0, len(view)
        while end - at >= HEADER_BYTES:
            version, kind, flags, stream, length = _HEADER.unpack_from(view, at)
            if version != 0:
                raise RemoteProtocolError(f"yamux: version {version} (only 0 exists)")
            if kind > Type.GO_AWAY:
                raise RemoteProtocolError(f"yamux: frame type {kind} is not one of DATA, WINDOW_UPDATE, PING, GO_AWAY")
            body = length if kind == Type.DATA else 0
            known = self._streams.get(stream)
            credit = known.receive_window if known is not None else INITIAL_WINDOW
            if body > credit:  # a stream not (or no longer) open never had more than the initial window
                raise RemoteProtocolError(f"yamux: {length} bytes on stream {stream} exceed the credit granted")
            if end - at < HEADER_BYTES + body:
                break
            payload = view[at + HEADER_BYTES : at + HEADER_BYTES + body]
            at += HEADER_BYTES + body
            self._frame(_TYPES[kind], flags, stream, length, payload, events)
        if at < end:
            self._in = bytearray(view[at:])
        return events

    def _frame(
        self, kind: Type, flags: int, stream: int, length: int, payload: memoryview, events: list[Event]
    ) -> None:
        """One frame's events, appended to ``events``."""
        # ``flags`` stays an int: IntFlag arithmetic costs microseconds a frame, on every ping
        if kind is Type.PING:
            if flags & _ACK:
                events.append(Pong(length))
            else:
                self._out.append(encode_frame(Type.PING, Flag.ACK, 0, length))
            return
        if kind is Type.GO_AWAY:
            self._going_away = True
            events.append(GoAway(length))
            return
        if stream == 0:
            raise RemoteProtocolError(f"yamux: a {kind.name} frame on stream 0")
        if flags & _SYN:
            events.append(self._opened(stream))
            if stream not in self._streams:
                return  # refused (reset); the rest of this frame is dropped with it
        state = self._streams.get(stream)
        if state is None:
            if flags & _RST or self._existed(stream):
                # A stream that is gone (reset, or closed both ways): what was in flight when it went
                # is discarded, as the spec says; only a stream that never existed is an error.
                self.discarded += len(payload)
                return
            raise RemoteProtocolError(f"yamux: a {kind.name} frame for stream {stream}, which never existed")
        if flags & _RST:
            del self._streams[stream]
            events.append(StreamReset(stream))
            return
        if kind is Type.WINDOW_UPDATE:
            state.send_window += length
            self._flush(stream, state)
        elif payload:
            self._step_in(stream, state, _Step.DATA_IN)
            state.receive_window -= len(payload)
            state.unacknowledged += len(payload)
            events.append(Data(stream, payload))
        if flags & _FIN:
            self._step_in(stream, state, _Step.FIN_IN)
            events.append(StreamClosed(stream))

    def _existed(self, stream: int) -> bool:
        """Whether ``stream`` was opened before (ids only grow: ours below our next id, the peer's to its highest)."""
        ours = stream % 2 == (1 if self.client else 0)
        return stream < self._next_id if ours else stream <= self._peer_highest

    def _opened(self, stream: int) -> StreamOpened | StreamRefused:
        if stream in self._streams or stream % 2 == (1 if self.client else 0) or stream <= self._peer_highest:
            raise RemoteProtocolError(f"yamux: the peer opened stream {stream}, which is not its to open")
        self._peer_highest = stream
        if self._going_away or len(self._streams) >= MAX_STREAMS:
            self._out.append(encode_frame(Type.WINDOW_UPDATE, Flag.RST, stream, 0))
            return StreamRefused(stream)
        self._streams[stream] = _Stream(_State.OPEN, receive_window=self.window)
        self._out.append(encode_frame(Type.WINDOW_UPDATE, Flag.ACK, stream, self.window - INITIAL_WINDOW))
        return StreamOpened(stream)

    def _step_in(self, stream: int, state: _Stream, step: _Step) -> None:
        if (state.state, step) not in _STEPS:
            raise RemoteProtocolError(f"yamux: {step.value} on stream {stream}, which is {state.state.value}")
        self._advance(stream, state, step)

    def open_streams(self) -> list[int]:
        return sorted(self._streams)

    def is_open(self, stream: int) -> bool:
        """Whether ``stream`` is one of :meth:`open_streams` (without sorting them)."""
        return stream in self._streams

    def queued(self, stream: int) -> int:
        """Bytes of ``stream`` waiting for the peer's credit (0 for a stream that is gone)."""
        state = self._streams.get(stream)
        return 0 if state is None else state.queued_bytes
