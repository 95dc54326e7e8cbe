"""BitChat fragmentation (packet type 0x20) and reassembly with limits; sans-I/O, the clock is an argument.

A packet whose frame is longer than what a link takes in one write is cut into
fragments (``BLEOutboundFragmentPlanner.swift``; ``FragmentPayload.kt``). Each
fragment is a packet of type 0x20 with the original's sender, timestamp, TTL,
recipient and route, unsigned, whose payload is::

    fragmentID(8, random) | index u16 | total u16 | originalType u8 | chunk

and the chunks are consecutive slices of the original's *encoded* frame
(:func:`.packet.frame`), ``max(64, limit - overhead)`` bytes each. BitChat
takes 42 for the overhead; here it is the exact size of the fragment's own
header (42 is too little once a source route rides along), so a fragment fits
the link whenever the limit leaves room for 64 bytes of chunk.

:class:`Reassembler` keys assemblies by (sender, fragment id) and holds them to
:class:`Limits` (Android's and the whitepaper's numbers): fragments per
message, bytes per message, assemblies at once (the oldest is dropped for a new
one) and a timeout, which the caller applies by calling :meth:`Reassembler.expire`
with its clock's time, as a tick message would (nothing here reads a clock).
A fragment that breaks a limit, disagrees with its assembly's total or type, or
completes into something that is not one packet of the announced type and
sender is a :class:`RemoteProtocolError`, and its assembly is dropped.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field

from villagemesh.errors import ConfigError, LocalProtocolError, RemoteProtocolError

from .packet import ID_BYTES, MessageType, Packet, decode, encode, frame

__all__ = [
    "FRAGMENT_HEADER_BYTES",
    "MIN_CHUNK",
    "Fragment",
    "Limits",
    "Reassembler",
    "decode_fragment",
    "encode_fragment",
    "fragment_packet",
]

FRAGMENT_HEADER_BYTES = 13
"""fragmentID 8 + index 2 + total 2 + originalType 1 (the thirteen-byte iOS header)."""
MIN_CHUNK = 64
"""A chunk is never smaller, however small the link's limit (BitChat's floor)."""

_HEADER = struct.Struct(">8sHHB")


@dataclass(frozen=True)
class Fragment:
    """One fragment's payload."""

    fragment_id: bytes
    index: int
    total: int
    original_type: int
    data: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.fragment_id, bytes) or len(self.fragment_id) != ID_BYTES:
            raise LocalProtocolError(f"fragment id must be {ID_BYTES} bytes, got {self.fragment_id!r}")
        if not (0 <= self.index < self.total <= 0xFFFF) or not 0 <= self.original_type <= 0xFF:
            raise LocalProtocolError(f"fragment {self.index}/{self.total} of type {self.original_type} is out of range")


def encode_fragment(fragment: Fragment) -> bytes:
    """The fragment payload."""
    f = fragment
    return _HEADER.pack(f.fragment_id, f.index, f.total, f.original_type) + f.data


def decode_fragment(data: bytes) -> Fragment:
    """A fragment payload.

    Raises:
        RemoteProtocolError: shorter than its header, or an index not below its total.
    """
    if len(data) < FRAGMENT_HEADER_BYTES:
        raise RemoteProtocolError(
            f"fragment payload of {len(data)} bytes is shorter than its {FRAGMENT_HEADER_BYTES}-byte header"
        )
    fragment_id, index, total, original_type = _HEADER.unpack_from(data)
    if index >= total:
        raise RemoteProtocolError(f"fragment index {index} is not below its total {total}")
    return Fragment(fragment_id, index, total, original_type, data[FRAGMENT_HEADER_BYTES:])


def fragment_packet(packet: Packet, limit: int, fragment_id: bytes) -> list[Packet]:
    """The packet as it goes over a link taking ``limit`` bytes per write: itself, or its fragments.

    Raises:
        LocalProtocolError: it would need more than 65535 fragments.
    """
    data = frame(packet)
    if len(data) <= limit:
        return [packet]
    template = Packet(
        type=MessageType.FRAGMENT,
        sender_id=packet.sender_id,
        timestamp=packet.timestamp,
        payload=bytes(FRAGMENT_HEADER_BYTES),
        ttl=packet.ttl,
        version=2 if packet.route else 1,
        recipient_id=packet.recipient_id,
        route=packet.route,
    )
    chunk = max(MIN_CHUNK, limit - len(encode(template)))
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    if len(pieces) > 0xFFFF:
        raise LocalProtocolError(f"a {len(data)}-byte packet needs {len(pieces)} fragments, more than 65535")
    return [
        dataclasses.replace(
            template, payload=encode_fragment(Fragment(fragment_id, index, len(pieces), packet.type, piece))
        )
        for index, piece in enumerate(pieces)
    ]


@dataclass(frozen=True)
class Limits:
    """What a reassembler holds at most."""

    max_fragments: int = 256
    """Fragments per message (Android's ``MAX_FRAGMENTS_PER_ID``)."""
    max_bytes: int = 1024 * 1024
    """Bytes per reassembled message (1 MiB: whitepaper §4.4, Android ``MAX_FRAGMENT_TOTAL_BYTES``)."""
    max_assemblies: int = 128
    """Messages being reassembled at once (iOS ``bleMaxInFlightAssemblies``)."""
    timeout: float = 30.0
    """Seconds an incomplete message is kept after its first fragment (whitepaper §4.4)."""

    def __post_init__(self) -> None:
        for name in ("max_fragments", "max_bytes", "max_assemblies"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"reassembly limit {name} must be an int >= 1, got {value!r}")
        if not self.timeout > 0:
            raise ConfigError(f"reassembly timeout must be > 0 seconds, got {self.timeout!r}")


@dataclass
class _Assembly:
    total: int
    original_type: int
    started: float
    chunks: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


class Reassembler:
    """Fragments in, whole packets out, within :class:`Limits`.

    Attributes:
        dropped: assemblies given up on so far (expired, evicted or refused).
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._assemblies: dict[tuple[bytes, bytes], _Assembly] = {}
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._assemblies)

    def receive(self, packet: Packet, now: float) -> Packet | None:
        """Take one fragment packet; the original packet once its last fragment arrived, else None.

        Raises:
            RemoteProtocolError: a malformed fragment, one over a limit, one
                that disagrees with its assembly, or a completed message that
                does not decode as a packet of the announced type and sender.
        """
        fragment = decode_fragment(packet.payload)
        key = (packet.sender_id, fragment.fragment_id)
        assembly = self._assemblies.get(key)
        if assembly is None:
            if fragment.total > self.limits.max_fragments:
                self.dropped += 1
                raise RemoteProtocolError(
                    f"message of {fragment.total} fragments is over the limit of {self.limits.max_fragments}"
                )
            if len(self._assemblies) >= self.limits.max_assemblies:
                del self._assemblies[next(iter(self._assemblies))]  # the oldest: dicts keep insertion order
                self.dropped += 1
            assembly = self._assemblies[key] = _Assembly(fragment.total, fragment.original_type, now)
        elif (assembly.total, assembly.original_type) != (fragment.total, fragment.original_type):
            self._drop(key)
            raise RemoteProtocolError(
                f"fragment {fragment.fragment_id.hex()} says {fragment.total} x type {fragment.original_type},"
                f" its first said {assembly.total} x type {assembly.original_type}"
            )
        if fragment.index in assembly.chunks:
            return None  # a duplicate (a relayed copy): the first one counts
        if assembly.size + len(fragment.data) > self.limits.max_bytes:
            self._drop(key)
            raise RemoteProtocolError(
                f"fragmented message {fragment.fragment_id.hex()} is over {self.limits.max_bytes} bytes"
            )
        assembly.chunks[fragment.index] = fragment.data
        assembly.size += len(fragment.data)
        if len(assembly.chunks) < assembly.total:
            return None
        del self._assemblies[key]
        try:
            whole = decode(b"".join(assembly.chunks[i] for i in range(assembly.total)))
        except RemoteProtocolError:
            self.dropped += 1
            raise
        if whole.type != assembly.original_type or whole.sender_id != packet.sender_id:
            self.dropped += 1
            raise RemoteProtocolError(
                f"fragments of type {assembly.original_type} from {packet.sender_id.hex()} completed into"
                f" type {whole.type} from {whole.sender_id.hex()}"
            )
        return whole

    def expire(self, now: float) -> list[tuple[bytes, bytes]]:
        """Drop the assemblies that started ``timeout`` or more seconds before ``now``; their (sender, id) keys."""
        old = [key for key, assembly in self._assemblies.items() if now - assembly.started >= self.limits.timeout]
        for key in old:
            self._drop(key)
        return old

    def _drop(self, key: tuple[bytes, bytes]) -> None:
        del self._assemblies[key]
        self.dropped += 1
