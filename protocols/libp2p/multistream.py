"""multistream-select 1.0, both roles, sans-I/O: which protocol a connection or stream speaks next.

Every message is ``uvarint(len(line) + 1) ‖ line ‖ "\\n"``; the first each side sends is
the header ``/multistream/1.0.0``. The dialer pipelines its header and first proposal;
the listener answers with its header, then echoes a protocol it speaks or says ``na``;
the dialer then proposes its next one, until one is agreed or it has none left::

    dialer   ── /multistream/1.0.0, /noise ──────────────▶ listener
             ◀── /multistream/1.0.0, na ──────────────────
             ── /tls/1.0.0 ────────────────────────────────▶
             ◀── /tls/1.0.0                                 (agreed)

Rules (as a table below, per role; anything else is a :class:`RemoteProtocolError`
and the object is dead):

- a line is at most :data:`MAX_LINE` bytes, printable ASCII; the header must be
  exactly :data:`HEADER`;
- the dialer accepts only the echo of its current proposal or ``na``;
- the listener refuses at most :data:`MAX_REFUSALS` proposals (a peer cannot keep
  it busy guessing), and answers ``ls`` with ``na`` (listing is not offered);
- after agreement nothing more is parsed: whatever followed in the stream is
  handed over untouched (:attr:`Negotiation.rest`), so no byte of the next
  protocol is lost.

Events from :meth:`Negotiation.receive_data`: :class:`Refused` (dialer: the listener
said ``na`` to a protocol), :class:`Agreed` (both roles), :class:`NoProtocol`
(dialer: every proposal was refused; terminal).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from villagemesh.errors import LocalProtocolError, RemoteProtocolError

from ..framing import NEED_DATA
from .varint import UvarintFramer, frame

__all__ = [
    "HEADER",
    "MAX_LINE",
    "MAX_REFUSALS",
    "Agreed",
    "Negotiation",
    "NoProtocol",
    "Refused",
    "message",
]

HEADER = "/multistream/1.0.0"
MAX_LINE = 1024
"""Bytes in one message: protocol ids are short paths; 1 KiB bounds what an undecided peer costs."""
MAX_REFUSALS = 32
"""Proposals a listener refuses before it gives up on the dialer."""
_NA = "na"


def message(line: str) -> bytes:
    """One multistream message carrying ``line``."""
    data = line.encode("ascii") + b"\n"
    if len(data) > MAX_LINE:
        raise LocalProtocolError(f"multistream: a message is at most {MAX_LINE} bytes, got {len(data)} ({line!r:.60})")
    return frame(data)


@dataclass(frozen=True, slots=True)
class Agreed:
    protocol: str


@dataclass(frozen=True, slots=True)
class Refused:
    protocol: str


@dataclass(frozen=True, slots=True)
class NoProtocol:
    """Every protocol the dialer proposed was refused."""

    proposed: tuple[str, ...]


class _State(enum.Enum):
    AWAIT_HEADER = "await header"
    AWAIT_ANSWER = "await answer"  # dialer
    AWAIT_PROPOSAL = "await proposal"  # listener
    AGREED = "agreed"
    FAILED = "failed"


class _Input(enum.Enum):
    HEADER = "header"
    ECHO = "echo of the proposal"
    NA = "na"
    PROPOSAL = "a proposal"


_DIALER: dict[tuple[_State, _Input], _State] = {
    (_State.AWAIT_HEADER, _Input.HEADER): _State.AWAIT_ANSWER,
    (_State.AWAIT_ANSWER, _Input.ECHO): _State.AGREED,
    (_State.AWAIT_ANSWER, _Input.NA): _State.AWAIT_ANSWER,  # next proposal sent (or FAILED when none is left)
}
_LISTENER: dict[tuple[_State, _Input], _State] = {
    (_State.AWAIT_HEADER, _Input.HEADER): _State.AWAIT_PROPOSAL,
    (_State.AWAIT_PROPOSAL, _Input.PROPOSAL): _State.AWAIT_PROPOSAL,  # refused (or AGREED when supported)
}


class Negotiation:
    """One side of one negotiation. Make it with :meth:`dialer` or :meth:`listener`."""

    def __init__(self, *, dialer: bool, protocols: Iterable[str]) -> None:
        self.is_dialer = dialer
        self.protocols = tuple(protocols)
        if not self.protocols:
            raise LocalProtocolError("multistream: a negotiation needs at least one protocol")
        for protocol in self.protocols:
            message(protocol)  # too long or not ASCII: refused here, not on the wire
        self._table = _DIALER if dialer else _LISTENER
        self._state = _State.AWAIT_HEADER
        self._framer = UvarintFramer(MAX_LINE)
        self._out = bytearray(message(HEADER))
        self._next = 0
        self._refusals = 0
        self.agreed: str | None = None
        if dialer:
            self._out += message(self.protocols[0])

    @classmethod
    def dialer(cls, protocols: Iterable[str]) -> Negotiation:
        """The side that proposes ``protocols``, most preferred first (header and first proposal go at once)."""
        return cls(dialer=True, protocols=protocols)

    @classmethod
    def listener(cls, protocols: Iterable[str]) -> Negotiation:
        """The side that speaks ``protocols`` and answers proposals."""
        return cls(dialer=False, protocols=protocols)

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer now (and clear them)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def rest(self) -> bytes:
        """After :class:`Agreed`: what the peer sent after the negotiation, for the next protocol."""
        if self._state is not _State.AGREED:
            raise LocalProtocolError(f"multistream: no agreement yet (state {self._state.value})")
        return self._framer.rest()

    def receive_data(self, data: bytes) -> list[Agreed | Refused | NoProtocol]:
        """Feed bytes from the peer; the events they complete, in order."""
        if self._state is _State.FAILED:
            raise LocalProtocolError("multistream: this negotiation has failed")
        self._framer.receive_data(data)
        events: list[Agreed | Refused | NoProtocol] = []
        while self._state not in (_State.AGREED, _State.FAILED):
            try:
                raw = self._framer.next_frame()
                if raw is NEED_DATA:
                    break
                events.extend(self._on_line(_line(raw)))
            except RemoteProtocolError:
                self._state = _State.FAILED
                raise
        return events

    def _on_line(self, line: str) -> list[Agreed | Refused | NoProtocol]:
        kind = self._classify(line)
        after = self._table.get((self._state, kind))
        if after is None:
            raise RemoteProtocolError(f"multistream: {kind.value} {line!r} is not expected {self._state.value}")
        self._state = after
        if kind is _Input.HEADER:
            return []
        if self.is_dialer:
            return self._answered(kind)
        return self._proposed(line)

    def _classify(self, line: str) -> _Input:
        if self._state is _State.AWAIT_HEADER:
            if line != HEADER:
                raise RemoteProtocolError(f"multistream: expected the header {HEADER!r}, got {line!r}")
            return _Input.HEADER
        if not self.is_dialer:
            return _Input.PROPOSAL
        if line == self.protocols[self._next]:
            return _Input.ECHO
        if line == _NA:
            return _Input.NA
        raise RemoteProtocolError(f"multistream: proposed {self.protocols[self._next]!r}, the listener said {line!r}")

    def _answered(self, kind: _Input) -> list[Agreed | Refused | NoProtocol]:
        proposal = self.protocols[self._next]
        if kind is _Input.ECHO:
            self.agreed = proposal
            return [Agreed(proposal)]
        self._next += 1
        if self._next == len(self.protocols):
            self._state = _State.FAILED
            return [Refused(proposal), NoProtocol(self.protocols)]
        self._out += message(self.protocols[self._next])
        return [Refused(proposal)]

    def _proposed(self, line: str) -> list[Agreed | Refused | NoProtocol]:
        if line in self.protocols:
            self._out += message(line)
            self._state = _State.AGREED
            self.agreed = line
            return [Agreed(line)]
        self._refusals += 1
        if self._refusals > MAX_REFUSALS:
            raise RemoteProtocolError(f"multistream: more than {MAX_REFUSALS} proposals refused")
        self._out += message(_NA)
        return []


def _line(raw: bytes) -> str:
    if not raw.endswith(b"\n"):
        raise RemoteProtocolError(f"multistream: a message must end in a newline, got {raw[-20:]!r}")
    body = raw[:-1]
    if not body or not all(0x20 < b < 0x7F for b in body):
        raise RemoteProtocolError(f"multistream: a protocol id is non-empty printable ASCII, got {body[:40]!r}")
    return body.decode("ascii")
