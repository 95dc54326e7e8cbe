"""The shared decodings of envelopes: a hit is exactly what decoding returns, and memory stays bounded."""

from __future__ import annotations

import os
import time

import pytest

from villagemesh.actors.core import envelopes
from villagemesh.errors import RemoteProtocolError
from villagemesh.protocols.envelope import Message, Priority, encode_message


def raw(payload: bytes = b"hi") -> tuple[Message, bytes]:
    message = Message(os.urandom(16), "DATA", "a" * 32, "b" * 32, Priority.NORMAL, time.time(), 60.0, None, payload)
    return message, encode_message(message)


def test_an_envelope_is_decoded_once_and_every_reader_gets_the_same_value() -> None:
    """Two decodes of equal bytes return the one decoded message, equal to what decoding gives."""
    message, data = raw()
    first = envelopes.decode(data)
    assert first == message and envelopes.decode(bytes(data)) is first


def test_a_remembered_message_is_returned_without_decoding() -> None:
    """What the builder remembered comes back for its encoding."""
    message, data = raw(b"built here")
    envelopes.remember(data, message)
    envelopes.remember(data, message)  # once is enough; again is harmless
    assert envelopes.decode(data) is message


def test_bytes_that_do_not_decode_raise_every_time_and_are_not_kept() -> None:
    """Garbage raises RemoteProtocolError, then again: no failure is remembered."""
    for _ in range(2):
        with pytest.raises(RemoteProtocolError):
            envelopes.decode(b"\x01garbage")


def test_the_cache_forgets_the_oldest_beyond_its_byte_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for about two envelopes, the first of three is forgotten (decoded anew: equal, not the same)."""
    monkeypatch.setattr(envelopes, "CACHE_BYTES", 2 * len(raw(b"x" * 100)[1]) + 1)
    items = [raw(b"x" * 100) for _ in range(3)]
    for message, data in items:
        envelopes.remember(data, message)
    assert envelopes.decode(items[2][1]) is items[2][0]
    again = envelopes.decode(items[0][1])
    assert again == items[0][0] and again is not items[0][0]


def test_the_cache_forgets_the_oldest_beyond_its_count_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for two envelopes by count (bytes to spare), the first of three is forgotten."""
    monkeypatch.setattr(envelopes, "CACHE_ENTRIES", 2)
    items = [raw(b"y") for _ in range(3)]
    for message, data in items:
        envelopes.remember(data, message)
    assert envelopes.decode(items[2][1]) is items[2][0]
    again = envelopes.decode(items[0][1])
    assert again == items[0][0] and again is not items[0][0]


def test_an_envelope_over_the_entry_bound_is_decoded_every_time_and_never_kept() -> None:
    """A transfer's chunk is not hashed for a lookup nor kept: each decode is a new, equal value."""
    message, data = raw(os.urandom(envelopes.ENTRY_BYTES))
    envelopes.remember(data, message)
    first = envelopes.decode(data)
    assert first == message and first is not message
    assert envelopes.decode(data) is not first
    assert data not in envelopes._cache
