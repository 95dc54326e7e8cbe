"""Which protocol is this connection speaking? A pure function of its first bytes.

One listening port serves several protocols. The acceptor peeks at the first
bytes a peer sends and asks :func:`sniff`; the answer is one of
:class:`Sniffed`. The sniffer **never consumes** bytes: it looks at a prefix and
returns a verdict, and the acceptor hands the *whole* buffer to the chosen
protocol. (The system villagemesh replaces read a discovery frame first and fell
back to its encrypted reader with those bytes already gone.)

What each protocol's first bytes look like::

    DISCOVERY_JSON      00 LL LL LL '{'          4-byte big-endian length, then a JSON object
                        (2 <= length <= MAX_DISCOVERY_FRAME: "{}" is the shortest object)
    SECURE              'V' 'M' 'S' 'C' ver      the magic header the secure channel's
                                                 initiator sends before its first Noise message
    LIBP2P_MULTISTREAM  13 "/multistream/1.0.0\\n" multistream-select 1.0.0 header
    HTTP                METHOD ' '               GET, HEAD, POST, PUT, DELETE, CONNECT,
                                                 OPTIONS, TRACE, PATCH, PRI (the HTTP/2 preface)
    TLS                 16 03 00..04             a handshake record, SSL 3.0 to TLS 1.3

Why the secure channel has a magic header: a bare Noise XX first message is a
2-byte length and a random-looking 32-byte ephemeral key, which no sniffer can
tell from noise. So our initiator first sends ``SECURE_MAGIC`` followed by a
version byte (see :mod:`villagemesh.protocols.noise`); the sniffer decides on
the four magic bytes alone and the channel itself rejects a version it does not
speak, naming it.

Rules (each a hypothesis property in ``tests/protocols/test_sniff.py``):

1. The signatures above are *prefix-free*: no completed signature is a prefix of
   another one (their first bytes differ, and every HTTP method ends in a space).
   So the verdict for a prefix never flips as more bytes arrive: once
   ``sniff(p)`` is not ``NEED_MORE``, ``sniff(p + more) == sniff(p)``.
2. ``NEED_MORE`` only while ``len(prefix) < MAX_SNIFF_BYTES`` and the prefix is
   still a prefix of some signature. Every signature fits in ``MAX_SNIFF_BYTES``,
   so a prefix that long is always decided.
3. Bytes past ``MAX_SNIFF_BYTES`` are never looked at.
"""

from __future__ import annotations

import enum

__all__ = [
    "DISCOVERY_MAX_LENGTH",
    "HTTP_METHODS",
    "MAX_SNIFF_BYTES",
    "MULTISTREAM_HEADER",
    "SECURE_MAGIC",
    "Sniffed",
    "sniff",
]


class Sniffed(enum.Enum):
    """The verdict of :func:`sniff`."""

    DISCOVERY_JSON = "discovery_json"
    SECURE = "secure"
    LIBP2P_MULTISTREAM = "libp2p_multistream"
    HTTP = "http"
    TLS = "tls"
    UNKNOWN = "unknown"
    NEED_MORE = "need_more"


SECURE_MAGIC = b"VMSC"
"""The first bytes of a villagemesh secure channel (the initiator sends it, then a version byte)."""

MULTISTREAM_HEADER = b"\x13/multistream/1.0.0\n"
"""multistream-select 1.0.0: uvarint length 19, the protocol id, a newline."""

HTTP_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH", b"PRI")
"""Request methods of RFC 9110 plus PATCH (RFC 5789) and PRI (the HTTP/2 connection preface)."""

DISCOVERY_MAX_LENGTH = 64 * 1024
"""Largest discovery frame body; the same bound as ``discovery.MAX_DISCOVERY_FRAME`` (a test checks)."""

_DISCOVERY_MIN_LENGTH = 2  # b"{}" is the shortest JSON object.

MAX_SNIFF_BYTES = len(MULTISTREAM_HEADER)
"""20 bytes: the longest signature (the multistream header) decides; "OPTIONS " needs 8, discovery 5."""

_TLS_HANDSHAKE = 0x16
_TLS_MAJOR = 0x03
_TLS_MAX_MINOR = 0x04

_LITERALS: tuple[tuple[bytes, Sniffed], ...] = (
    (SECURE_MAGIC, Sniffed.SECURE),
    (MULTISTREAM_HEADER, Sniffed.LIBP2P_MULTISTREAM),
    *((method + b" ", Sniffed.HTTP) for method in HTTP_METHODS),
)


def sniff(prefix: bytes) -> Sniffed:
    """Classify a connection by its first bytes, without consuming them.

    Args:
        prefix: the bytes received so far (any length; only the first
            ``MAX_SNIFF_BYTES`` are examined).

    Returns:
        the protocol, ``Sniffed.NEED_MORE`` if the prefix is shorter than
        ``MAX_SNIFF_BYTES`` and still ambiguous, or ``Sniffed.UNKNOWN``.
    """
    head = bytes(prefix[:MAX_SNIFF_BYTES])
    pending = False
    for signature, verdict in _LITERALS:
        if head.startswith(signature):
            return verdict
        pending = pending or signature.startswith(head)
    tls = _match_tls(head)
    if tls is not None:
        return tls
    discovery = _match_discovery(head)
    if discovery is not None:
        return discovery
    if pending or _tls_pending(head) or _discovery_pending(head):
        return Sniffed.NEED_MORE
    return Sniffed.UNKNOWN


def _match_tls(head: bytes) -> Sniffed | None:
    if len(head) >= 3 and head[0] == _TLS_HANDSHAKE and head[1] == _TLS_MAJOR and head[2] <= _TLS_MAX_MINOR:
        return Sniffed.TLS
    return None


def _tls_pending(head: bytes) -> bool:
    return len(head) < 3 and bytes([_TLS_HANDSHAKE, _TLS_MAJOR]).startswith(head)


def _match_discovery(head: bytes) -> Sniffed | None:
    if len(head) >= 5 and _discovery_length_ok(head[:4]) and head[4] == ord("{"):
        return Sniffed.DISCOVERY_JSON
    return None


def _discovery_pending(head: bytes) -> bool:
    if len(head) >= 5:
        return False
    if len(head) == 4:
        return _discovery_length_ok(head)
    # Some completion of the length bytes must land in range: the smallest
    # completion pads with 0x00, the largest with 0xff.
    low = int.from_bytes(head.ljust(4, b"\x00"), "big")
    high = int.from_bytes(head.ljust(4, b"\xff"), "big")
    return low <= DISCOVERY_MAX_LENGTH and high >= _DISCOVERY_MIN_LENGTH


def _discovery_length_ok(length_bytes: bytes) -> bool:
    return _DISCOVERY_MIN_LENGTH <= int.from_bytes(length_bytes, "big") <= DISCOVERY_MAX_LENGTH
