"""The message envelope every villagemesh transport carries, and its compact binary codec.

A :class:`Message` (alias :data:`UnifiedMessage`, the name the replaced system's
users know) is one addressed, prioritised, expiring piece of payload. Its
clock fields are given by the caller: nothing here reads a clock.

Wire layout of version 1 (all integers big-endian; ``struct``, not JSON)::

    offset  size  field
    0       1     version            PROTOCOL_VERSION (1); decoding checks it first
    1       16    id                 128 bits unique to the message (a node makes them time-ordered:
                                     villagemesh.actors.core.ids; any unique 16 bytes decode)
    17      1     priority           0 CRITICAL .. 4 BULK
    18      1     flags              bit 0: recipient present, bit 1: correlation id present
    19      8     created_at         float64 seconds (caller's clock)
    27      8     ttl                float64 seconds, > 0
    35      1+K   kind               1-byte length, UTF-8
            1+S   sender             1-byte length, UTF-8
            1+R   recipient          only if flag bit 0 (absent = broadcast)
            16    correlation id     only if flag bit 1
            4+P   payload            4-byte length, raw bytes

Limits (each with its reason):

- ``MAX_NAME_BYTES`` = 255 for kind, sender and recipient: a one-byte length;
  node ids are 32 hex characters and kinds short upper-case words.
- ``MAX_PAYLOAD_BYTES`` = 1 MiB: a tensor chunk or a sync batch fits; bigger
  transfers are split by the application so one message cannot monopolise a link.
- ``MAX_MESSAGE_BYTES`` = the payload limit plus the largest header: a hard cap
  checked on the input's length (and on a stream's length prefix) before parsing.

Decoding is strict, so every byte string has at most one meaning: unknown flag
bits, trailing bytes, non-UTF-8 names and out-of-range numbers are
:class:`RemoteProtocolError`. Constructing an invalid :class:`Message` is a
:class:`LocalProtocolError` naming the value.

For streams, :func:`frame_message` prefixes the encoding with a 4-byte length
and :class:`FrameDecoder` is the sans-I/O receiver (``receive_data`` /
``next_event``).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import struct
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Any

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

from .framing import NEED_DATA, FramedConnection, NeedData

__all__ = [
    "ID_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_NAME_BYTES",
    "MAX_PAYLOAD_BYTES",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "FrameDecoder",
    "Message",
    "Priority",
    "UnifiedMessage",
    "decode_message",
    "encode_message",
    "frame_message",
    "sibling",
]

PROTOCOL_VERSION = 1
"""The envelope codec's version byte."""

ID_BYTES = 16
"""Message and correlation ids are 128 bits: random ids that do not collide in practice."""

MAX_NAME_BYTES = 255
"""kind, sender and recipient are at most 255 UTF-8 bytes: a one-byte length on the wire."""

MAX_PAYLOAD_BYTES = 1024 * 1024
"""1 MiB: a tensor chunk or sync batch fits; larger transfers are split so no message hogs a link."""

_FIXED = struct.Struct(">B16sBBdd")
_LEN1 = struct.Struct(">B")
_LEN4 = struct.Struct(">I")
_FLAG_RECIPIENT = 0x01
_FLAG_CORRELATION = 0x02

MAX_MESSAGE_BYTES = _FIXED.size + 3 * (1 + MAX_NAME_BYTES) + ID_BYTES + _LEN4.size + MAX_PAYLOAD_BYTES
"""Hard cap on one encoded message: the payload limit plus the largest possible header."""


class Priority(enum.IntEnum):
    """Delivery priority; lower values go first."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3
    BULK = 4


@dataclass(frozen=True)
class Message:
    """One addressed, prioritised, expiring message.

    Attributes:
        id: 16 bytes identifying the message, unique (the caller makes them: random, or
            time-ordered as a node does, :mod:`villagemesh.actors.core.ids`).
        kind: what the payload is, e.g. ``"DATA"``, ``"HEARTBEAT"``.
        sender: the sending node's id.
        recipient: the receiving node's id, or None for a broadcast.
        priority: a :class:`Priority`.
        created_at: when the sender made it, seconds on the caller's clock.
        ttl: seconds the message stays deliverable after ``created_at`` (> 0).
        correlation_id: the id of the message this one answers, if any.
        payload: the application bytes (at most ``MAX_PAYLOAD_BYTES``).
        version: the envelope version (only ``PROTOCOL_VERSION`` exists).

    Raises:
        LocalProtocolError: a field is invalid (the message names it).
    """

    id: bytes
    kind: str
    sender: str
    recipient: str | None
    priority: Priority
    created_at: float
    ttl: float
    correlation_id: bytes | None
    payload: bytes
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_id("id", self.id)
        if self.correlation_id is not None:
            _check_id("correlation_id", self.correlation_id)
        _check_name("kind", self.kind)
        _check_name("sender", self.sender)
        if self.recipient is not None:
            _check_name("recipient", self.recipient)
        if not isinstance(self.priority, Priority):
            raise LocalProtocolError(f"priority must be a Priority, got {self.priority!r}")
        if not _is_number(self.created_at) or not math.isfinite(self.created_at):
            raise LocalProtocolError(f"created_at must be a finite number of seconds, got {self.created_at!r}")
        if not _is_number(self.ttl) or not (math.isfinite(self.ttl) and self.ttl > 0):
            raise LocalProtocolError(f"ttl must be a finite number of seconds > 0, got {self.ttl!r}")
        if not isinstance(self.payload, bytes):
            raise LocalProtocolError(f"payload must be bytes, got {type(self.payload).__name__}")
        if len(self.payload) > MAX_PAYLOAD_BYTES:
            raise LocalProtocolError(
                f"payload of {len(self.payload)} bytes exceeds MAX_PAYLOAD_BYTES ({MAX_PAYLOAD_BYTES})"
            )
        if self.version != PROTOCOL_VERSION or isinstance(self.version, bool):
            raise LocalProtocolError(f"unsupported envelope version {self.version!r} (only {PROTOCOL_VERSION})")

    @property
    def expires_at(self) -> float:
        """``created_at + ttl``: after this instant the message must not be delivered."""
        return self.created_at + self.ttl

    @property
    def is_broadcast(self) -> bool:
        """True when the message has no single recipient."""
        return self.recipient is None

    def is_expired(self, now: float) -> bool:
        """Whether the message has expired at ``now`` (seconds on the same clock as ``created_at``)."""
        return now >= self.expires_at


UnifiedMessage = Message
"""The name the replaced system's users know."""


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_id(field: str, value: object) -> None:
    if not isinstance(value, bytes) or len(value) != ID_BYTES:
        raise LocalProtocolError(f"{field} must be {ID_BYTES} bytes, got {value!r}")


_GOOD_NAMES: set[str] = set()
"""Names (kinds, node ids) already found valid: the same few recur in every message."""

_GOOD_NAMES_MAX = 4096


def _check_name(field: str, value: object) -> None:
    if type(value) is str and value in _GOOD_NAMES:
        return
    if not isinstance(value, str) or not value:
        raise LocalProtocolError(f"{field} must be a non-empty str, got {value!r}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"{field} {value!r} is not encodable as UTF-8") from exc
    if size > MAX_NAME_BYTES:
        raise LocalProtocolError(f"{field} {value[:40]!r}... is {size} UTF-8 bytes; the limit is {MAX_NAME_BYTES}")
    if len(_GOOD_NAMES) >= _GOOD_NAMES_MAX:
        _GOOD_NAMES.clear()  # bounded: a flood of distinct names costs a re-check, not memory
    _GOOD_NAMES.add(value)


def sibling(template: Message, id: bytes, recipient: str | None, payload: bytes) -> Message:
    """``template`` with another ``id``, ``recipient`` and ``payload``: ``dataclasses.replace`` for the
    messages of one batch, made faster by checking only those three (the others were checked when
    ``template`` was made). A value the quick checks do not settle goes through the constructor.

    Raises:
        LocalProtocolError: as the constructor does, for the id, recipient or payload.
    """
    if (
        type(template) is Message
        and type(id) is bytes
        and len(id) == ID_BYTES
        and type(payload) is bytes
        and len(payload) <= MAX_PAYLOAD_BYTES
        and (recipient is None or (type(recipient) is str and recipient in _GOOD_NAMES))
    ):
        return _unchecked({**template.__dict__, "id": id, "recipient": recipient, "payload": payload})
    return dataclasses.replace(template, id=id, recipient=recipient, payload=payload)


def _unchecked(values: dict[str, Any]) -> Message:
    """A Message holding ``values`` (every field, already checked by the caller), made without the
    constructor: a frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``
    and checks them all again, most of what making one costs."""
    message = object.__new__(Message)
    message.__dict__.update(values)
    return message


def encode_message(message: Message) -> bytes:
    """The compact binary encoding of ``message`` (at most ``MAX_MESSAGE_BYTES``)."""
    flags = (_FLAG_RECIPIENT if message.recipient is not None else 0) | (
        _FLAG_CORRELATION if message.correlation_id is not None else 0
    )
    parts = [
        _FIXED.pack(
            message.version, message.id, message.priority, flags, float(message.created_at), float(message.ttl)
        ),
        _name(message.kind),
        _name(message.sender),
    ]
    if message.recipient is not None:
        parts.append(_name(message.recipient))
    if message.correlation_id is not None:
        parts.append(message.correlation_id)
    parts.append(_LEN4.pack(len(message.payload)))
    parts.append(message.payload)
    return b"".join(parts)


def _name(value: str) -> bytes:
    raw = value.encode("utf-8")
    return _LEN1.pack(len(raw)) + raw


class _Cursor:
    """Reads fields off a byte string; running out of bytes is the peer's fault."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int, field: str) -> bytes:
        end = self.pos + count
        if end > len(self.data):
            raise RemoteProtocolError(
                f"envelope truncated in {field}: needs {count} bytes at offset {self.pos}, has {len(self.data)} total"
            )
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def name(self, field: str) -> str:
        (size,) = _LEN1.unpack(self.take(1, field))
        raw = self.take(size, field)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(f"envelope {field} is not UTF-8: {raw!r}") from exc


def decode_message(data: bytes) -> Message:
    """Decode one message encoded by :func:`encode_message`.

    Raises:
        RemoteProtocolError: ``data`` is oversized, truncated, has trailing
            bytes, an unknown version, priority or flag, or an invalid field.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise RemoteProtocolError(f"envelope of {len(data)} bytes exceeds MAX_MESSAGE_BYTES ({MAX_MESSAGE_BYTES})")
    data = bytes(data)
    fields = _fields(data)
    try:
        # Something off in the bytes: the careful reading names what.
        return _built(fields) if fields is not None else _decode_checked(data)
    except LocalProtocolError as exc:  # well formed, but a field's value is not allowed
        raise RemoteProtocolError(f"peer sent an invalid envelope: {exc}") from exc


def _fields(data: bytes) -> tuple[Any, ...] | None:
    """The fields of a well-formed encoding in Message's order, or None when anything is off
    (short, trailing bytes, a bad flag, priority, version or UTF-8). The common case, read in
    one pass with no checks on the way; the careful reading names what is wrong."""
    fixed = _FIXED.size
    if len(data) < fixed + 6 or data[0] != PROTOCOL_VERSION:
        return None
    version, id_, priority, flags, created_at, ttl = _FIXED.unpack_from(data)
    if flags & ~(_FLAG_RECIPIENT | _FLAG_CORRELATION) or priority not in _PRIORITIES:
        return None
    try:
        end = fixed + 1 + data[fixed]
        kind = data[fixed + 1 : end].decode()
        start = end + 1
        end = start + data[end]
        sender = data[start:end].decode()
        recipient = None
        if flags & _FLAG_RECIPIENT:
            start = end + 1
            end = start + data[end]
            recipient = data[start:end].decode()
        correlation_id = None
        if flags & _FLAG_CORRELATION:
            correlation_id = data[end : end + ID_BYTES]
            end += ID_BYTES
        (size,) = _LEN4.unpack_from(data, end)
    except (IndexError, UnicodeDecodeError, struct.error):
        return None
    end += _LEN4.size
    if end + size != len(data):  # (every slice above ended before ``end``: none was cut short)
        return None
    payload = data[end:]
    return id_, kind, sender, recipient, _PRIORITIES[priority], created_at, ttl, correlation_id, payload, version


def _built(fields: tuple[Any, ...]) -> Message:
    """The Message of ``fields`` from :func:`_fields`, whose reading settled the types, the id's and
    correlation id's sizes, the priority, the version and each name's bound (a one-byte length).
    What is left is checked here; then the fields are set at once (:func:`_unchecked`: the
    constructor was three quarters of a decode's time). Anything off goes to the constructor,
    whose checks name it."""
    _, kind, sender, recipient, _, created_at, ttl, _, payload, _ = fields
    if (
        kind
        and sender
        and recipient != ""
        and math.isfinite(created_at)
        and math.isfinite(ttl)
        and ttl > 0
        and len(payload) <= MAX_PAYLOAD_BYTES
    ):
        return _unchecked(dict(zip(_FIELD_NAMES, fields, strict=True)))
    return Message(*fields)


def _decode_checked(data: bytes) -> Message:
    """:func:`decode_message` field by field, each check naming what it found wrong (a field's value
    that Message refuses raises its LocalProtocolError)."""
    if data and data[0] != PROTOCOL_VERSION:
        raise RemoteProtocolError(f"unsupported envelope version {data[0]} (only {PROTOCOL_VERSION})")
    cursor = _Cursor(data)
    version, id_, priority, flags, created_at, ttl = _FIXED.unpack(cursor.take(_FIXED.size, "header"))
    if flags & ~(_FLAG_RECIPIENT | _FLAG_CORRELATION):
        raise RemoteProtocolError(f"envelope has unknown flag bits {flags:#04x}")
    try:
        prio = Priority(priority)
    except ValueError as exc:
        raise RemoteProtocolError(f"envelope has unknown priority {priority}") from exc
    kind = cursor.name("kind")
    sender = cursor.name("sender")
    recipient = cursor.name("recipient") if flags & _FLAG_RECIPIENT else None
    correlation_id = cursor.take(ID_BYTES, "correlation_id") if flags & _FLAG_CORRELATION else None
    (size,) = _LEN4.unpack(cursor.take(_LEN4.size, "payload length"))
    payload = cursor.take(size, "payload")
    if cursor.pos != len(data):
        raise RemoteProtocolError(f"envelope has {len(data) - cursor.pos} trailing bytes")
    return Message(
        id=id_,
        kind=kind,
        sender=sender,
        recipient=recipient,
        priority=prio,
        created_at=created_at,
        ttl=ttl,
        correlation_id=correlation_id,
        payload=payload,
        version=version,
    )


_PRIORITIES = {int(p): p for p in Priority}
_FIELD_NAMES = tuple(f.name for f in dataclass_fields(Message))
"""Message's fields in order (what :func:`_fields` returns)."""


def frame_message(message: Message) -> bytes:
    """``message`` encoded and prefixed with its 4-byte big-endian length, for stream transports."""
    body = encode_message(message)
    return _LEN4.pack(len(body)) + body


class FrameDecoder(FramedConnection[Message]):
    """Sans-I/O receiver of framed messages: ``receive_data(bytes)``, ``next_event() -> Message | NEED_DATA``.

    A length prefix above ``MAX_MESSAGE_BYTES`` raises :class:`RemoteProtocolError`
    as soon as its four bytes arrive, before any body is buffered.
    """

    def __init__(self) -> None:
        super().__init__(_LEN4, MAX_MESSAGE_BYTES, "envelope", decode_message)

    def next_event(self) -> Message | NeedData:
        """The next whole message, or :data:`NEED_DATA`; raises only :class:`RemoteProtocolError`."""
        return super().next_event()
