"""Decoded envelopes shared by a node's threads: an encoded envelope is decoded once per process.

An envelope crosses several threads of a node as bytes, and each needs its
fields: on receipt the secure session (its sender), the retrier (id, recipient,
expiry, kind) and the app gateway (everything, for the handlers); on sending
the API builds it, and the retrier and the session read it back. Decoding and
validating costs ~10 µs a time, more than the rest of a hop. :func:`decode`
keeps the decoded :class:`~villagemesh.protocols.envelope.Message` by its exact
bytes, so each later reader gets the same frozen value for a dictionary
lookup; :func:`remember` lets whoever built the message put it there first.

The same bytes always decode to the same value (the encoding is canonical and
the message immutable), so a hit is exactly what decoding would have returned;
bytes that do not decode raise as ``decode_message`` does and are not kept.
Bounded by :data:`CACHE_BYTES` and :data:`CACHE_ENTRIES` (oldest forgotten first), and an envelope
over :data:`ENTRY_BYTES` is never kept;
thread-safe. The count bound is for the collector: every kept message is an
object a full garbage collection walks while it holds the interpreter lock,
and tens of thousands of small ones made such a pause ~15 ms long, which an
asyncio program embedding the node sees as a stalled loop.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from villagemesh.protocols.envelope import Message, decode_message

__all__ = ["CACHE_BYTES", "CACHE_ENTRIES", "ENTRY_BYTES", "decode", "remember"]

CACHE_BYTES = 16 << 20
"""Envelope bytes kept at most (keys and payloads, about twice this in memory): a few thousand
in flight at 16 KiB, tens of thousands at 64 B, the span between a message's first and last reader."""
CACHE_ENTRIES = 4096
"""Envelopes kept at most: a few windows of messages in flight (a miss only costs a decode)."""

ENTRY_BYTES = 64 << 10
"""Envelopes larger than this are decoded every time, never kept: hashing one for the lookup costs about
what decoding it does (a transfer's 256 KiB chunk took ~0.15 ms of SipHash per hop, ~0.25 s of CPU
per 256 MiB over both nodes), and 64 of them would fill :data:`CACHE_BYTES`, pushing out the small
messages the cache is for (and keeping 16 MiB of chunks alive per process)."""

_lock = threading.Lock()
_cache: OrderedDict[bytes, Message] = OrderedDict()
_size = 0


def decode(raw: bytes) -> Message:
    """``decode_message(raw)``, decoded at most once while ``raw`` stays in the cache.

    Raises:
        RemoteProtocolError: as ``decode_message`` (nothing is kept).
    """
    if len(raw) > ENTRY_BYTES:
        return decode_message(raw)
    with _lock:
        message = _cache.get(raw)
    if message is None:
        message = decode_message(raw)
        remember(raw, message)
    return message


def remember(raw: bytes, message: Message) -> None:
    """Keep ``message`` as the decoding of ``raw`` (its encoding: the caller just made one from the other)."""
    global _size
    if len(raw) > ENTRY_BYTES:
        return
    raw = bytes(raw)
    with _lock:
        if raw in _cache:
            return
        _cache[raw] = message
        _size += len(raw)
        while (_size > CACHE_BYTES or len(_cache) > CACHE_ENTRIES) and _cache:
            old, _ = _cache.popitem(last=False)
            _size -= len(old)
